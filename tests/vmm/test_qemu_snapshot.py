"""QEMU snapshots on real guests: pause -> state + frozen disk layer -> resume; restore in
place; clone beside the original with its own identity; integrity manifest."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.serial_shell import serial_run
from vms.vmm.agent_client import AgentConnection, AgentTransport, agent_socket_path, wait_for_agent
from vms.vmm.base import RuntimeState, VmmStateError, VmSpec
from vms.vmm.qemu import QemuDriver
from vms.vmm.snapshot import (
    DISK_LAYER,
    STATE_FILE,
    SnapshotIntegrityError,
    SnapshotMeta,
    backing_chain,
    manifest_verify,
    manifest_write,
    sha256_file,
)

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]
SERIAL = AgentTransport.VIRTIO_SERIAL


def _sh(spec: VmSpec, command: str) -> str:
    status, out = serial_run(spec.runtime_dir / "serial.sock", command, timeout=60)
    assert status == 0, (command, out)
    return out.strip()


def _agent(spec: VmSpec, op: str, args: dict[str, object] | None = None) -> dict[str, object]:
    with AgentConnection.open(agent_socket_path(spec), SERIAL, timeout=10) as conn:
        return conn.request(op, args, timeout=10)


@pytest.fixture(scope="module")
def snap_root() -> Iterator[Path]:
    # Not below pytest's 0700 tmp root: a VMM restoring a snapshot (as the VMM user) reads it.
    root = Path(tempfile.mkdtemp(prefix="vmt-snaps-", dir="/tmp"))
    root.chmod(0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def original(driver: QemuDriver, make_spec: Callable[..., VmSpec]) -> Iterator[VmSpec]:
    spec = make_spec("snap", cmdline="sandbox.hostname=original")
    driver.launch(spec)
    wait_for_agent(spec, SERIAL, timeout=150)
    yield spec
    driver.cleanup(spec)


def test_it_snapshots_a_running_vm_and_restores_file_and_memory(
    driver: QemuDriver, original: VmSpec, snap_root: Path
) -> None:
    spec = original
    _sh(spec, "echo before > /root/marker && sync")
    pid = _sh(spec, "(sleep 100000 >/dev/null 2>&1 & echo $!)")
    _sh(spec, "export SNAPVAL=alpha")

    meta = driver.snapshot(spec, snap_root / "s1", include_memory=True)
    checksum = manifest_write(snap_root / "s1")
    assert meta.include_memory and meta.state_file == STATE_FILE
    assert (snap_root / "s1" / STATE_FILE).stat().st_size > 1 << 20
    assert meta.pause_ms < 30000
    assert backing_chain(snap_root / "s1" / DISK_LAYER) == [str(spec.base_image.resolve())]
    assert backing_chain(spec.runtime_dir / "overlay.qcow2")[0] == str((snap_root / "s1" / DISK_LAYER).resolve())
    assert driver.info(spec).state == RuntimeState.RUNNING
    layer_sum = sha256_file(snap_root / "s1" / DISK_LAYER)
    # Confined: the frozen layer goes back to root, readable (not writable) by the VMM group;
    # the state file was written by QEMU through an fd we opened, so it is ours too.
    layer_stat = (snap_root / "s1" / DISK_LAYER).stat()
    assert (layer_stat.st_uid, layer_stat.st_mode & 0o777) == (0, 0o640)
    assert (snap_root / "s1" / STATE_FILE).stat().st_uid == 0
    assert (spec.runtime_dir / "overlay.qcow2").stat().st_uid != 0

    _sh(spec, "echo after > /root/marker && sync")
    _sh(spec, f"kill {pid}")
    _sh(spec, "export SNAPVAL=beta")
    assert _sh(spec, "cat /root/marker") == "after"
    # The frozen layer is never written again: its checksum holds.
    assert sha256_file(snap_root / "s1" / DISK_LAYER) == layer_sum
    manifest_verify(snap_root / "s1", expected_checksum=checksum)

    driver.shutdown(spec, force=True)
    started = time.monotonic()
    driver.restore(spec, snap_root / "s1")
    ping = wait_for_agent(spec, SERIAL, timeout=60)
    print(f"restore-to-agent: {time.monotonic() - started:.2f}s")
    assert ping["hostname"] == "original"
    assert _sh(spec, "cat /root/marker") == "before"
    assert _sh(spec, f"kill -0 {pid} && echo alive") == "alive"
    assert _sh(spec, "echo $SNAPVAL") == "alpha"


def test_a_clone_runs_beside_the_original_with_its_own_identity(
    driver: QemuDriver, original: VmSpec, make_spec: Callable[..., VmSpec], snap_root: Path
) -> None:
    clone = make_spec("clone", cmdline="sandbox.hostname=clone-1")
    driver.restore(clone, snap_root / "s1")
    try:
        wait_for_agent(clone, SERIAL, timeout=60)
        before = _agent(clone, "identity_get")
        assert before["hostname"] == "original"
        result = _agent(
            clone,
            "identity_set",
            {
                "hostname": "clone-1",
                "machine_id": "0123456789abcdef0123456789abcdef",
                "clock_unix": time.time(),
                "entropy": "ab" * 32,
            },
        )
        identity = result["identity"]
        assert isinstance(identity, dict)
        assert identity["hostname"] == "clone-1"
        assert identity["machine_id"] == "0123456789abcdef0123456789abcdef"
        assert abs(float(identity["clock_unix"]) - time.time()) < 30
        assert _sh(clone, "cat /root/marker") == "before"
        assert _agent(original, "identity_get")["hostname"] == "original"
    finally:
        driver.cleanup(clone)


def test_a_second_snapshot_stacks_on_the_first(driver: QemuDriver, original: VmSpec, snap_root: Path) -> None:
    meta = driver.snapshot(original, snap_root / "s2", include_memory=False)
    manifest_write(snap_root / "s2")
    assert not meta.include_memory and not (snap_root / "s2" / STATE_FILE).exists()
    assert backing_chain(snap_root / "s2" / DISK_LAYER)[0] == str((snap_root / "s1" / DISK_LAYER).resolve())
    assert driver.info(original).state == RuntimeState.RUNNING


def test_a_memory_snapshot_of_a_stopped_vm_is_refused_but_disk_only_works(
    driver: QemuDriver, original: VmSpec, snap_root: Path
) -> None:
    driver.shutdown(original, force=True)
    with pytest.raises(VmmStateError):
        driver.snapshot(original, snap_root / "s3", include_memory=True)
    meta = driver.snapshot(original, snap_root / "s3b", include_memory=False)
    assert meta.pause_ms == 0
    assert SnapshotMeta.read(snap_root / "s3b").driver == "qemu"


def test_manifest_names_a_corrupted_or_missing_file(tmp_path: Path) -> None:
    (tmp_path / "state.bin").write_bytes(b"x" * 4096)
    (tmp_path / "disk.qcow2").write_bytes(b"y" * 4096)
    checksum = manifest_write(tmp_path)
    manifest_verify(tmp_path, expected_checksum=checksum)
    with open(tmp_path / "state.bin", "r+b") as fh:
        fh.seek(100)
        fh.write(b"z")
    with pytest.raises(SnapshotIntegrityError) as err:
        manifest_verify(tmp_path)
    assert err.value.path == tmp_path / "state.bin" and "corrupted" in err.value.message
    (tmp_path / "disk.qcow2").unlink()
    with pytest.raises(SnapshotIntegrityError) as err:
        manifest_verify(tmp_path)
    assert err.value.reason == "missing" and "disk.qcow2" in err.value.message
