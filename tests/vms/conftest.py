import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.hostd.test_hostd import FAKE_VMM, Hostd
from tests.waiting import wait_until
from vms.models import VM


@pytest.fixture
def vm_runtime(vm, settings):
    """The owner's VM 'running' on a stand-in VMM (tests/hostd/fake_vmm.py: the real guest
    agent code on this host, one agent client at a time like QEMU); no hostd."""
    root = Path(tempfile.mkdtemp(prefix="api-", dir="/tmp"))  # Unix socket paths are short
    settings.SANDBOX_RUNTIME_DIR = root
    settings.SANDBOX_HOSTD_SOCKET = root / "hostd.sock"
    settings.SANDBOX_FILE_UPLOAD_MAX_BYTES = 1 << 20
    rd = root / str(vm.pk)
    rd.mkdir()
    (rd / "spec.json").write_text("{}")
    proc = subprocess.Popen([sys.executable, str(FAKE_VMM), str(rd)], start_new_session=True)
    VM.objects.filter(pk=vm.pk).update(state="running")
    vm.refresh_from_db()
    try:
        wait_until((rd / "agent.sock").exists)
        yield vm, root
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.fixture
def live_vm(vm_runtime):
    """``vm_runtime`` with a real hostd in front of the VM."""
    vm, root = vm_runtime
    hostd = Hostd(root)
    hostd.start()
    try:
        yield vm, root
    finally:
        hostd.stop()
