"""guest_agents/linux/install.sh against fresh directory layouts (systemd, OpenRC, busybox
and sysvinit inittab, none), on the host; the same checks run inside a VM in test_uefi_vm.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .installer_checks import INSTALLER_CHECKS

AGENT_DIR = Path(__file__).resolve().parents[2] / "guest_agents" / "linux"


def test_the_installer_writes_the_agent_and_registers_it_with_each_init(tmp_path: Path) -> None:
    script = tmp_path / "checks.sh"
    script.write_text(INSTALLER_CHECKS)
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(
        ["sh", str(script), str(AGENT_DIR), str(work)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0 and "INSTALLER-OK" in proc.stdout, proc.stdout + proc.stderr
