"""The driver package and the guest agent must not import Django."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import importlib, pkgutil, runpy, sys
import vms.vmm
names = sorted(m.name for m in pkgutil.iter_modules(vms.vmm.__path__, "vms.vmm."))
for name in names:
    importlib.import_module(name)
runpy.run_path("guest_agents/linux/sandbox_agent.py", run_name="not_main")
bad = sorted(m for m in sys.modules if m == "django" or m.startswith("django.") or m == "rest_framework")
print(",".join(names))
sys.exit(1 if bad or len(names) < 5 else 0)
"""


def test_vmm_package_imports_no_django() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "vms.vmm.qemu" in proc.stdout and "vms.vmm.image" in proc.stdout
