"""The driver package, the host daemon and the guest agent must not import Django."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import importlib, pkgutil, runpy, sys
import vms.hostd, vms.vmm
names = []
for package in (vms.vmm, vms.hostd):
    names += sorted(m.name for m in pkgutil.iter_modules(package.__path__, package.__name__ + "."))
for name in names:
    importlib.import_module(name)
runpy.run_path("guest_agents/linux/sandbox_agent.py", run_name="not_main")
bad = sorted(m for m in sys.modules if m == "django" or m.startswith("django.") or m == "rest_framework")
print(",".join(names))
print("django modules:", ",".join(bad))
sys.exit(1 if bad else 0)
"""


def test_driver_and_hostd_packages_import_no_django() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    imported = set(proc.stdout.splitlines()[0].split(","))
    assert {"vms.vmm.qemu", "vms.vmm.image", "vms.vmm.process", "vms.vmm.snapshot"} <= imported
    assert {"vms.hostd.daemon", "vms.hostd.client", "vms.hostd.agent_link", "vms.hostd.console"} <= imported
