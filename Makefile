# microvm-sandbox: `make run` to try it, `make test` to run the whole suite.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
TEST_ENV := DATABASE_URL=postgres://postgres@127.0.0.1:5432/microvm_sandbox \
	REDIS_URL=redis://127.0.0.1:6379/0 SECRET_KEY=test-only-secret-key DEBUG=0 \
	SANDBOX_IMAGE_DIR=$(CURDIR)/var/images

.PHONY: run test system venv lock env image lint check-deploy clean benchmarks static-vendor install

system:
	./scripts/install-system-packages.sh

# Dependencies are declared in pyproject.toml and pinned in requirements/lock.txt: install exactly
# the lock, then our own packages (editable: the server, and the SDK in sdk/) without resolving
# anything again.
$(VENV)/.installed: pyproject.toml sdk/pyproject.toml requirements/lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/lock.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip install -q --no-deps -e sdk   # the SDK and `msbx` (its dependencies are in the lock)
	touch $@

venv: $(VENV)/.installed

# Regenerate the lock after changing dependencies in pyproject.toml; existing pins are kept
# unless a requirement needs another version (`make lock LOCK_ARGS=--upgrade` moves them all).
lock: venv
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile -q --extra dev --strip-extras \
	  --no-emit-index-url --no-emit-find-links $(LOCK_ARGS) -o requirements/lock.txt pyproject.toml

.env:
	umask 077; echo "SECRET_KEY=$$($(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(50))')" > .env

env: .env

# Browser libraries come from the npm registry through frontend/package-lock.json.
static/vendor/.installed: frontend/package.json frontend/package-lock.json
	cd frontend && npm ci --no-audit --no-fund --loglevel=error
	mkdir -p static/vendor
	cp frontend/node_modules/@xterm/xterm/lib/xterm.js frontend/node_modules/@xterm/xterm/css/xterm.css \
	   frontend/node_modules/@xterm/addon-fit/lib/addon-fit.js \
	   frontend/node_modules/chart.js/dist/chart.umd.min.js static/vendor/
	# For the browser tests' accessibility audit only (no page loads it).
	cp frontend/node_modules/axe-core/axe.min.js static/vendor/
	touch $@

static-vendor: static/vendor/.installed

image: venv
	$(PY) manage.py build_image

run: system venv env static-vendor
	mkdir -p var
	$(PY) manage.py migrate --noinput
	$(PY) manage.py collectstatic --noinput -v 0
	$(PY) manage.py bootstrap_admin
	$(PY) manage.py build_image
	./scripts/run.sh

# Install as systemd services on this Debian host (docs/operations.md): code in /opt/microvm-sandbox,
# settings in /etc/microvm-sandbox/env, data in /var/lib/microvm-sandbox.
install: static-vendor
	./scripts/install.sh

test: system venv static-vendor
	./scripts/ensure-services.sh
	# Build (or reuse) the guest images up front, so their progress shows; they need no database.
	$(PY) -m vms.vmm.image $(CURDIR)/var/images
	$(PY) -m vms.vmm.image_uefi $(CURDIR)/var/images
	$(TEST_ENV) $(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy vms/vmm vms/hostd

benchmarks: system venv
	./scripts/ensure-services.sh
	for b in benchmarks/*.py; do case $$b in */__init__.py|*/standin.py) ;; *) $(TEST_ENV) $(PY) $$b || exit 1;; esac; done

clean:
	rm -rf var/run var/log
