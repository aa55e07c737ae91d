"""The guest image's init scripts (vms/vmm/image.py): the applets they call exist in the busybox
that goes into the image, and the UEFI image's guest-setup script (systemd) reads the sandbox.*
words from SMBIOS as well, once."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from vms.vmm.image import BUSYBOX, RC_SYSINIT, RUN_AGENT, RUN_POWERBTN
from vms.vmm.image_uefi import GUEST_SETUP_SCRIPT

needs_busybox = pytest.mark.skipif(not BUSYBOX.exists(), reason=f"needs {BUSYBOX} (busybox-static)")


@needs_busybox
def test_every_busybox_applet_the_scripts_call_exists() -> None:
    applets = set(subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, timeout=10).stdout.split())
    called = set()
    for script in (RC_SYSINIT, RUN_AGENT, RUN_POWERBTN):
        called |= set(re.findall(r"(?:\$bb|/usr/local/bin/busybox) ([a-z0-9]+)", script))
    assert called, "the scripts call busybox applets"
    assert called <= applets, f"not in this busybox: {sorted(called - applets)}"


@pytest.mark.skipif(shutil.which("dash") is None, reason="needs dash (the guest's /bin/sh)")
def test_the_scripts_are_valid_sh() -> None:
    for script in (RC_SYSINIT, GUEST_SETUP_SCRIPT, RUN_AGENT, RUN_POWERBTN):
        proc = subprocess.run(["dash", "-n"], input=script, capture_output=True, text=True, timeout=10)
        assert proc.returncode == 0, proc.stderr


def test_the_uefi_guest_setup_reads_smbios_oem_strings_once() -> None:
    assert "/sys/firmware/dmi/entries/11-" in GUEST_SETUP_SCRIPT
    assert GUEST_SETUP_SCRIPT.count("sandbox_args()") == 1 and GUEST_SETUP_SCRIPT.count("$(sandbox_args)") == 1
    assert GUEST_SETUP_SCRIPT.count("for arg in $args") == RC_SYSINIT.count("$(sandbox_args)") == 2


def test_the_agent_starts_from_its_module_without_site_packages() -> None:
    assert "python3 -I -S -u -c" in RUN_AGENT and "import sandbox_agent" in RUN_AGENT
