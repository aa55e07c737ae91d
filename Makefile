# microvm-sandbox: `make run` to try it, `make test` to run the whole suite.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
TEST_ENV := DATABASE_URL=postgres://postgres@127.0.0.1:5432/microvm_sandbox \
	REDIS_URL=redis://127.0.0.1:6379/0 SECRET_KEY=test-only-secret-key DEBUG=0 \
	SANDBOX_IMAGE_DIR=$(CURDIR)/var/images

.PHONY: run test system venv env image lint check-deploy clean benchmarks static-vendor

system:
	./scripts/install-system-packages.sh

$(VENV)/.installed: requirements/base.in requirements/dev.in requirements/lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/base.in -r requirements/dev.in -c requirements/lock.txt
	touch $@

venv: $(VENV)/.installed

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

test: system venv static-vendor
	./scripts/ensure-services.sh
	# Build (or reuse) the guest image up front, so its progress shows; it needs no database.
	$(PY) -m vms.vmm.image $(CURDIR)/var/images
	$(TEST_ENV) $(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy vms/vmm vms/hostd

benchmarks: system venv
	./scripts/ensure-services.sh
	for b in benchmarks/*.py; do case $$b in */__init__.py) ;; *) $(TEST_ENV) $(PY) $$b || exit 1;; esac; done

clean:
	rm -rf var/run var/log
