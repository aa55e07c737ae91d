"""Live migration with the Cloud Hypervisor driver, against the spec-checking fake VMM
(``vm.receive-migration`` / ``vm.send-migration``). Run with ``-p no:django``.

Cloud Hypervisor recreates the VM on the target from the source's own config, so the
runtime directory has the same path on both hosts. Here the "target host" is a private
mount namespace in which that path shows another directory (the target's own files); its
driver calls run in a helper process inside it. Migration traffic stays on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vmm.test_cloud_hypervisor import FAKE_BIN, agent_ping, images, make_spec, pid_gone, short_dir  # noqa: F401
from vms.vmm.base import MigrationTarget, RuntimeState, VmmError, VmmStateError, VmSpec
from vms.vmm.cloud_hypervisor import ChApiClient, ChRuntimePaths, CloudHypervisorDriver

# What the target host runs: one driver call inside the namespace, the answer as JSON.
TARGET_SCRIPT = r"""
import json, sys
from pathlib import Path
from vms.vmm.base import VmSpec, VmmError
from vms.vmm.cloud_hypervisor import CloudHypervisorDriver, ChRuntimePaths
from vms.vmm.agent_client import AgentConnection, AgentTransport

action, binary, spec_json = sys.argv[1], sys.argv[2], sys.argv[3]
spec = VmSpec.from_json(spec_json)
driver = CloudHypervisorDriver(binary=binary)
out = {}
try:
    if action == "prepare":
        out["target"] = driver.migrate_receive_prepare(spec, listen_host="127.0.0.1", timeout=20).to_dict()
        out["pid"] = driver.vmm_pid(spec)
    elif action == "finish":
        driver.migrate_receive_finish(spec, timeout=20)
        out["state"] = driver.info(spec).state.value
        path = ChRuntimePaths(spec.runtime_dir).agent_socket
        with AgentConnection.open(path, AgentTransport.HYBRID_VSOCK, timeout=10) as conn:
            out["ping"] = conn.ping(timeout=10)
    elif action == "abort":
        driver.migrate_receive_abort(spec)
        out["pid"] = driver.vmm_pid(spec)
except VmmError as exc:
    out["error"] = exc.message
print(json.dumps(out))
"""


@pytest.fixture
def target_view() -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.skip("the second host's mount namespace needs root, unshare and nsenter")
    path = Path(tempfile.mkdtemp(prefix="ch-t-", dir="/tmp"))
    yield path
    for pid_file in path.glob("*/vmm.pid"):
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)


def _on_target(action: str, spec: VmSpec, view: Path, *, enter_pid: int | None = None) -> dict[str, object]:
    """Run ``action`` on the "target host": a new mount namespace with ``view`` bound over
    the runtime root (``prepare``), or the one the target VMM ``enter_pid`` lives in."""
    root = spec.runtime_dir.parent
    call = [sys.executable, "-c", TARGET_SCRIPT, action, str(FAKE_BIN), spec.to_json()]
    if enter_pid is None:
        bind = 'v="$1"; r="$2"; shift 2; mount --bind "$v" "$r" && exec "$@"'
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", bind, "sh", str(view), str(root), *call]
    else:
        argv = ["nsenter", f"--mount=/proc/{enter_pid}/ns/mnt", "--", *call]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=os.environ.copy())  # noqa: S603
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_it_moves_a_running_vm_to_a_vmm_on_another_host(
    short_dir: Path,  # noqa: F811
    images: tuple[Path, Path],  # noqa: F811
    target_view: Path,
) -> None:
    driver = CloudHypervisorDriver(binary=str(FAKE_BIN))
    spec = make_spec(short_dir, images)
    driver.prepare(spec)
    driver.launch(spec)
    paths = ChRuntimePaths(spec.runtime_dir)
    boot_id = agent_ping(paths.agent_socket)["boot_id"]
    source_pid = driver.vmm_pid(spec)
    assert source_pid is not None

    # Without its disk on the target host, cloud-hypervisor cannot take the VM.
    refused = _on_target("prepare", spec, target_view)
    assert "does not copy disks" in str(refused.get("error"))
    # The disk is on the target (shared storage, or copied): same path, its own file.
    (target_view / spec.runtime_dir.name).mkdir()
    shutil.copyfile(paths.overlay, target_view / spec.runtime_dir.name / paths.overlay.name)

    # A sender that cannot reach the target: the VM runs on at the source.
    with pytest.raises(VmmError):
        driver.migrate_send(spec, MigrationTarget(driver=driver.name, host="127.0.0.1", port=1), timeout=5)
    assert driver.info(spec).state == RuntimeState.RUNNING
    # Another runtime directory on the target: refused before anything is sent.
    elsewhere = MigrationTarget(driver=driver.name, host="127.0.0.1", port=1, runtime_dir="/elsewhere")
    with pytest.raises(VmmError, match="same paths"):
        driver.migrate_send(spec, elsewhere)

    prepared = _on_target("prepare", spec, target_view)
    assert "error" not in prepared, prepared
    target = MigrationTarget.from_dict(prepared["target"])  # type: ignore[arg-type]
    target_pid = int(prepared["pid"])  # type: ignore[call-overload]
    assert target.host == "127.0.0.1" and target.port > 0 and target.runtime_dir == str(spec.runtime_dir.resolve())
    # Receiving, the target VMM answers nothing else (like the real binary).
    target_api = Path(f"/proc/{target_pid}/root") / str(paths.api_socket).lstrip("/")
    with ChApiClient(target_api, timeout=0.5) as api, pytest.raises(VmmError):
        api.vm_info()

    result = driver.migrate_send(spec, target, timeout=30)
    assert result.disk_sync == "shared"
    # The source VMM exits by itself once the VM is sent.
    deadline = time.monotonic() + 10
    while not pid_gone(source_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid_gone(source_pid), "the source VMM did not exit after the migration"
    assert driver.info(spec).state == RuntimeState.GONE

    finished = _on_target("finish", spec, target_view, enter_pid=target_pid)
    assert finished.get("state") == "running", finished
    # The guest agent answers on the target with the same boot: the guest did not restart.
    assert finished["ping"]["boot_id"] == boot_id  # type: ignore[index]
    # The target's files are its own: the source's runtime directory is untouched.
    assert (target_view / spec.runtime_dir.name / "spec.json").is_file()

    # The target VMM already holds a VM: a second receive is refused.
    again = _on_target("prepare", spec, target_view, enter_pid=target_pid)
    assert "already runs" in str(again.get("error"))
    aborted = _on_target("abort", spec, target_view, enter_pid=target_pid)
    assert aborted["pid"] is None and pid_gone(target_pid)
    driver.cleanup(spec)


def test_the_fake_refuses_a_send_from_a_vm_that_is_not_running(
    short_dir: Path,  # noqa: F811
    images: tuple[Path, Path],  # noqa: F811
) -> None:
    driver = CloudHypervisorDriver(binary=str(FAKE_BIN))
    spec = make_spec(short_dir, images)
    driver.prepare(spec)
    driver.launch(spec)
    driver.pause(spec)
    with pytest.raises(VmmStateError):
        driver.migrate_send(spec, MigrationTarget(driver=driver.name, host="127.0.0.1", port=1), timeout=5)
    with ChApiClient(ChRuntimePaths(spec.runtime_dir).api_socket) as api, pytest.raises(VmmStateError):
        api.vm_send_migration("tcp:127.0.0.1:1", downtime_ms=300, timeout_s=5)
    driver.cleanup(spec)
