"""hostd runs as root and the console log lives where the VM's unprivileged VMM can write: a
VMM that replaces ``serial.log`` by a symlink (to a file only root may read or write), a hard
link or a FIFO gets nothing out of hostd: the log download answers "no log", the console
stream reads nothing, and capping or appending never writes through the link."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.hostd.runner import Hostd
from vms.hostd import console
from vms.hostd.client import HostdClient
from vms.hostd.errors import HostdError

SECRET = b"root-only secret\n" * 64


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_bytes(SECRET)
    path.chmod(0o600)
    return path


def _vm_dir(tmp_path: Path) -> Path:
    vm_dir = tmp_path / "run" / "vm1"
    vm_dir.mkdir(parents=True)
    return vm_dir


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo"])
def test_the_log_download_never_reads_what_the_log_was_replaced_by(tmp_path, secret, kind):
    vm_dir = _vm_dir(tmp_path)
    log = vm_dir / console.SERIAL_LOG
    {"symlink": lambda: log.symlink_to(secret), "hardlink": lambda: os.link(secret, log),
     "fifo": lambda: os.mkfifo(log)}[kind]()  # fmt: skip
    hostd = Hostd(tmp_path / "run").start()
    try:
        with HostdClient(hostd.config.socket_path, timeout=10) as client:
            with pytest.raises(HostdError) as refused:  # without blocking on the FIFO either
                client.call("console_log_read", {"vm_id": "vm1"})
            assert refused.value.code == "not_found"
            with pytest.raises(HostdError) as bad:
                client.call("console_log_read", {"vm_id": "vm\x001"})
            assert bad.value.code == "bad_request"
    finally:
        hostd.stop()
    assert secret.read_bytes() == SECRET


def test_reads_caps_and_appends_never_go_through_a_symlink(tmp_path, secret):
    log = _vm_dir(tmp_path) / console.SERIAL_LOG
    log.symlink_to(secret)
    with pytest.raises(OSError):
        console.log_read(log, None, 1 << 20)
    assert console._pread(log, 0, 100) == b""
    assert console._first_data(log, 100) == 0 and console._allocated(log) == 0
    with pytest.raises(OSError):
        console._punch(log, 0, 4096)
    with pytest.raises(OSError):
        console._append(log, b"appended by hostd")
    assert secret.read_bytes() == SECRET and secret.stat().st_blocks > 0


def test_the_console_stream_does_not_read_a_log_replaced_by_a_symlink(tmp_path, secret):
    vm_dir = _vm_dir(tmp_path)
    log = vm_dir / console.SERIAL_LOG
    log.write_bytes(b"booting\n")
    link = console.ConsoleLink("vm1", vm_dir, ring_bytes=1 << 16, qemu_log=True, log_max_bytes=1 << 20)
    link._prefill()
    assert link.ring.read(0, 1 << 16) == b"booting\n"
    log.unlink()
    log.symlink_to(secret)  # the VMM swaps the log for a link to a root-only file
    assert link._read_new() == b""
    link2 = console.ConsoleLink("vm1", vm_dir, ring_bytes=1 << 16, qemu_log=True, log_max_bytes=1 << 20)
    link2._prefill()  # a restarted hostd does not take it either
    assert link2.ring.read(0, 1 << 16) == b""
    assert secret.read_bytes() == SECRET
