"""Deployment files: systemd units (systemd-analyze verify), alerting rules (promtool),
the container image (built when an engine can), scripts/install.sh and the process-log pipe."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
SERVICES = ("msbx-hostd.service", "msbx-web.service", "msbx-beat.service", "msbx-worker@local.service")


def _render(dest: Path) -> None:
    """The units as scripts/install.sh renders them, pointed at this checkout (whose .venv
    has the binaries the units start: verify checks that they exist)."""
    (dest / "env").write_text("BIND=127.0.0.1\nPORT=8000\n")
    values = {"@PREFIX@": ROOT, "@ETC@": dest, "@DATA@": dest, "@USER@": "root", "@GROUP@": "root"}
    for unit in UNITS.iterdir():
        text = unit.read_text()
        for key, value in values.items():
            text = text.replace(key, str(value))
        (dest / unit.name).write_text(text)
    shutil.copy(dest / "msbx-worker@.service", dest / "msbx-worker@local.service")


def _unit(name: str) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def test_it_verifies_every_unit_with_systemd_analyze(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd, requirements/apt.txt)")
    if not (ROOT / ".venv" / "bin" / "daphne").exists():
        pytest.skip("no .venv in the checkout: the units' ExecStart binaries cannot be checked")
    _render(tmp_path)
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "msbx.target", *SERVICES],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"},
    )
    # Any line is a finding (unknown keys, bad values are only warnings, rc 0).
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stdout + proc.stderr


def test_it_keeps_vms_running_across_worker_restarts_and_orders_hostd_first():
    worker = _unit("msbx-worker@.service")
    assert worker["KillMode"] == ["process"]
    assert "msbx-hostd.service" in " ".join(worker["After"])
    assert "CAP_NET_ADMIN" in worker["CapabilityBoundingSet"][0]
    assert "User" not in worker  # plumbing needs root (with a bounded capability set)
    for name in ("msbx-web.service", "msbx-beat.service"):
        unit = _unit(name)
        assert unit["User"] == ["@USER@"] and unit["CapabilityBoundingSet"] == [""]
        assert unit["NoNewPrivileges"] == ["yes"] and unit["ProtectSystem"] == ["strict"]
    for name in ("msbx-hostd.service", "msbx-web.service", "msbx-beat.service", "msbx-worker@.service"):
        unit = _unit(name)
        assert unit["Restart"] == ["always"] and unit["PartOf"] == ["msbx.target"]
        assert unit["WantedBy"] == ["msbx.target"]


def test_the_install_script_is_valid_bash_and_renders_every_placeholder():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "install.sh")], check=True, timeout=30)
    script = (ROOT / "scripts" / "install.sh").read_text()
    placeholders = set(re.findall(r"@[A-Z]+@", "".join(u.read_text() for u in UNITS.iterdir())))
    assert placeholders == {"@PREFIX@", "@ETC@", "@DATA@", "@USER@", "@GROUP@"}
    assert all(p in script for p in placeholders)


def test_it_checks_the_alerting_rules_with_promtool():
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package prometheus, requirements/apt.txt)")
    rules = ROOT / "deploy" / "prometheus" / "alerts.yml"
    proc = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    proc = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_runbook_entry():
    alerts = re.findall(r"- alert: (\w+)", (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    runbook = (ROOT / "docs" / "operations.md").read_text()
    assert len(alerts) >= 6
    missing = [a for a in alerts if f"### {a}" not in runbook]
    assert not missing, f"docs/operations.md has no runbook entry for {missing}"


def _engine() -> str | None:
    for engine in ("podman", "docker"):
        if shutil.which(engine) is None:
            continue
        probe = subprocess.run([engine, "info"], capture_output=True, timeout=60, check=False)
        if probe.returncode == 0:
            return engine
    return None


BASE = "docker.io/library/debian:bookworm-slim"


def _base_image(engine: str) -> str | None:
    """The Dockerfile's base image: present, pulled, or (where no container registry can be
    reached, only Debian's and PyPI's) made with debootstrap from Debian's packages and
    imported under the same name. None when neither works."""
    if subprocess.run([engine, "image", "inspect", BASE], capture_output=True, timeout=60).returncode == 0:
        return BASE
    if subprocess.run([engine, "pull", BASE], capture_output=True, timeout=300).returncode == 0:
        return BASE
    if shutil.which("debootstrap") is None:
        return None
    with tempfile.TemporaryDirectory(prefix="msbx-base-") as root:
        made = subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", root, "http://deb.debian.org/debian"],
            capture_output=True,
            timeout=1200,
        )
        if made.returncode != 0:
            return None
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run([engine, "import", "-", BASE], stdin=tar.stdout, capture_output=True, timeout=600)
        tar.wait(timeout=60)
    return BASE if imported.returncode == 0 else None


# Its own steps allow up to 20 min (debootstrap of the base image on a machine without one) and
# 40 min (the build): the suite-wide 600 s would cut a cold first build short.
@pytest.mark.timeout(3600)
def test_it_builds_the_container_image():
    engine = _engine()
    if engine is None:
        pytest.skip("no working container engine (podman, or docker with its daemon running) on this machine")
    if _base_image(engine) is None:
        pytest.skip(f"{engine} can neither pull {BASE} nor make it with debootstrap here")
    argv = [engine, "build", "--pull=never", "--network=host"]
    if engine == "podman":
        argv.append("--isolation=chroot")  # no OCI runtime needed (crun refuses hybrid cgroups)
    ca = Path("/etc/ssl/certs/ca-certificates.crt")
    if ca.is_file():  # a TLS-intercepting proxy's CA reaches pip as a build secret
        argv += ["--secret", f"id=ca,src={ca}"]
    argv += ["-f", "deploy/container/Dockerfile", "--target", "control-plane", "-t", "msbx-test:latest", "."]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=2400, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The image runs Django as its non-root user (uid 990) with every dependency in place.
    check = "cd /opt/microvm-sandbox && id -u && python3 manage.py check -v0 && python3 -c 'import prometheus_client'"
    run = subprocess.run(
        [engine, "run", "--rm", "--network=host", "-e", "SECRET_KEY=x", "msbx-test:latest", "sh", "-c", check],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if run.returncode != 0 and engine == "podman" and ("OCI" in run.stderr or "cgroup" in run.stderr):
        # This machine's OCI runtime cannot start containers (crun: hybrid cgroups, rlimits):
        # run the same check in the image's file system with chroot instead.
        container = subprocess.run([engine, "create", "msbx-test:latest"], capture_output=True, text=True, check=True)
        cid = container.stdout.strip()
        try:
            mount = subprocess.run([engine, "mount", cid], capture_output=True, text=True, check=True).stdout.strip()
            env = {"PATH": "/opt/microvm-sandbox/.venv/bin:/usr/bin:/bin", "SECRET_KEY": "x"}
            env |= {"SANDBOX_ENV_FILE": "/nonexistent", "SANDBOX_DATA_DIR": "/var/lib/microvm-sandbox"}
            run = subprocess.run(
                [shutil.which("chroot") or "/usr/sbin/chroot", "--userspec=990:990", mount, "/bin/sh", "-c", check],
                capture_output=True, text=True, timeout=300, check=False, env=env,
            )  # fmt: skip
        finally:
            subprocess.run([engine, "umount", cid], capture_output=True, check=False)
            subprocess.run([engine, "rm", cid], capture_output=True, check=False)
    assert run.returncode == 0 and run.stdout.split()[0] == "990", run.stdout + run.stderr


def test_the_log_pipe_keeps_every_file_under_its_cap(tmp_path):
    log = tmp_path / "worker.log"
    line = b"x" * 99 + b"\n"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "logpipe.py"), str(log), "--max-bytes", "4096", "--backups", "3"],
        input=line * 500 + b"y" * 10000,  # 60 KB of lines, then one line longer than the cap
        timeout=60,
        check=True,
    )
    assert proc.returncode == 0
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["worker.log", "worker.log.1", "worker.log.2", "worker.log.3"]
    assert all(f.stat().st_size <= 4096 for f in files)
    # Lines stay whole where they fit; the newest bytes are kept.
    assert log.read_bytes().endswith(b"y" * 100)
    assert (tmp_path / "worker.log.3").read_bytes().startswith(b"x")


def test_run_sh_writes_every_process_log_through_the_pipe():
    script = (ROOT / "scripts" / "run.sh").read_text()
    assert ">>" not in script.split("trap cleanup", 1)[1]
    assert script.count("> >(logto ") == 5
