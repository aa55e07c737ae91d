"""cloud-hypervisor gets the same confinement as QEMU: the fake VMM (tests/vmm/bin) is launched
as the VMM user, in its own cgroup, with no_new_privs, and keeps ``--seccomp true``."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from vms.vmm.base import RuntimeState, VmmUnsupported, VmSpec
from vms.vmm.cgroups import cgroup_layout, cgroup_of, vmm_cgroup_dirs
from vms.vmm.cloud_hypervisor import CloudHypervisorDriver
from vms.vmm.confinement import VmmConfinement

from .conftest import TEST_CGROUP_PARENT, VMM_USER

HERE = Path(__file__).resolve().parent
FAKE_BIN = HERE / "bin" / "cloud-hypervisor"


@pytest.fixture
def confined_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("confining a VMM needs root")
    # The fake runs as the VMM user, which cannot reach our interpreter when it lives in a
    # private home: use the system Python of the same version, with our site-packages.
    system_python = Path(f"/usr/bin/python3.{sys.version_info.minor}")
    if not system_python.exists():
        pytest.skip(f"{system_python} is needed to run the fake VMM as another user")
    monkeypatch.setenv("FAKE_CH_PYTHON", str(system_python))
    monkeypatch.setenv("PYTHONPATH", str(Path(jsonschema.__file__).resolve().parents[1]))
    root = Path(tempfile.mkdtemp(prefix="ch-conf-", dir="/tmp"))
    root.chmod(0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _spec(root: Path, **kw: object) -> VmSpec:
    kernel = root / "vmlinux"
    kernel.write_bytes(b"\x7fELF fake kernel")
    base = root / "base.raw"
    with base.open("wb") as fh:
        fh.truncate(4 << 20)
    args: dict[str, object] = {
        "vm_id": "chconf",
        "runtime_dir": root / "vm",
        "kernel": kernel,
        "base_image": base,
        "vcpus": 2,
        "max_vcpus": 2,
        "memory_mib": 256,
        "max_memory_mib": 512,
    }
    args.update(kw)
    return VmSpec(**args)  # type: ignore[arg-type]


def test_cloud_hypervisor_runs_as_the_vmm_user_in_its_cgroup_with_seccomp(confined_dir: Path) -> None:
    confinement = VmmConfinement(user=VMM_USER, cgroup_parent=TEST_CGROUP_PARENT)
    driver = CloudHypervisorDriver(binary=str(FAKE_BIN), confinement=confinement)
    spec = _spec(confined_dir)
    driver.prepare(spec)
    try:
        result = driver.launch(spec, timeout=30)
        user = confinement.vmm_user()
        assert user is not None
        status = dict(
            (key, value.strip())
            for key, _, value in (
                line.partition(":") for line in Path(f"/proc/{result.pid}/status").read_text().splitlines()
            )
        )
        assert status["Uid"].split() == [str(user.uid)] * 4
        assert status["NoNewPrivs"] == "1"
        argv = Path(f"/proc/{result.pid}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"--seccomp") + 1] == b"true"
        expected = f"/{TEST_CGROUP_PARENT}/{confinement.cgroup_name(spec)}"
        groups = cgroup_of(result.pid)
        layout = cgroup_layout()
        for controller in [""] if layout.v2 is not None else ["cpu", "memory", "pids"]:
            assert groups[controller] == expected, groups
        if layout.v2 is None:
            cpu = layout.v1["cpu"] / TEST_CGROUP_PARENT / confinement.cgroup_name(spec)
            assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "200000"  # 2 vCPUs
            memory = layout.v1["memory"] / TEST_CGROUP_PARENT / confinement.cgroup_name(spec)
            limit = (512 + confinement.memory_overhead_mib) << 20  # the most it can grow to
            assert (memory / "memory.limit_in_bytes").read_text().strip() == str(limit)
        assert driver.info(spec).state == RuntimeState.RUNNING
        # What the VMM created is its own; what we wrote stays ours.
        assert (spec.runtime_dir / "api.sock").stat().st_uid == user.uid
        assert (spec.runtime_dir / "overlay.qcow2").stat().st_uid == user.uid
        assert (spec.runtime_dir / "spec.json").stat().st_uid == 0
        # CH writes a snapshot itself (as the VMM user); afterwards it is root's, readable by
        # the VMM group only, and a restore (as the VMM user) reads it.
        snap = confined_dir / "snaps" / "s1"
        snap.parent.mkdir()
        driver.snapshot(spec, snap, include_memory=True)
        for name in ("config.json", "state.json", "memory-ranges"):
            st = (snap / name).stat()
            assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, user.gid, 0o640), name
        driver.shutdown(spec, force=True)
        driver.restore(spec, snap, timeout=30)
        assert driver.info(spec).state == RuntimeState.RUNNING
        driver.shutdown(spec, force=True)
        assert not any(path.exists() for path in vmm_cgroup_dirs(TEST_CGROUP_PARENT, confinement.cgroup_name(spec)))
    finally:
        driver.cleanup(spec)


def test_a_nic_under_an_unprivileged_cloud_hypervisor_is_refused_clearly(confined_dir: Path) -> None:
    driver = CloudHypervisorDriver(binary=str(FAKE_BIN), confinement=VmmConfinement(user=VMM_USER))
    spec = _spec(confined_dir, tap="msbt0123456789")
    driver.prepare(spec)
    try:
        with pytest.raises(VmmUnsupported, match="SANDBOX_VMM_USER"):
            driver.launch(spec, timeout=10)
    finally:
        driver.cleanup(spec)
