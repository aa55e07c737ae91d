"""VMM confinement without a VM: cgroup layouts and limits (fake hierarchies), the launcher
joining a real cgroup and dropping to the VMM user before exec, and its clear errors."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vms.vmm.base import VmmError, VmSpec
from vms.vmm.cgroups import (
    CPU_PERIOD_US,
    CgroupLayout,
    CgroupLimits,
    cgroup_layout,
    cgroup_name,
    cgroup_of,
    vmm_cgroup_create,
    vmm_cgroup_dirs,
    vmm_cgroup_remove,
)
from vms.vmm.confinement import VmmConfinement
from vms.vmm.process import kill_vmm, spawn_detached

from .conftest import TEST_CGROUP_PARENT, VMM_USER

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""


def test_a_hybrid_host_without_v2_controllers_uses_v1() -> None:
    layout = cgroup_layout(HYBRID_MOUNTINFO)  # /sys/fs/cgroup/unified offers no cpu/memory/pids here
    assert layout.v2 is None or (layout.v2 / "cgroup.controllers").read_text().split()
    assert layout.v1["cpu"] == Path("/sys/fs/cgroup/cpu,cpuacct")
    assert layout.v1["memory"] == Path("/sys/fs/cgroup/memory")
    assert layout.v1["pids"] == Path("/sys/fs/cgroup/pids")


def _fake_v1(root: Path) -> CgroupLayout:
    files = {
        "cpu": ("cpu.cfs_period_us", "cpu.cfs_quota_us"),
        "memory": ("memory.limit_in_bytes",),
        "pids": ("pids.max",),
        "blkio": ("blkio.weight",),
    }
    for controller, names in files.items():
        group = root / controller / "parent" / "vm-1"
        group.mkdir(parents=True)
        for name in (*names, "cgroup.procs"):
            (group / name).write_text("")
    return CgroupLayout(v2=None, v1={c: root / c for c in files})


def _fake_v2(root: Path) -> CgroupLayout:
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("cpu memory\n")
    group = root / "parent" / "vm-1"
    group.mkdir(parents=True)
    (root / "parent" / "cgroup.controllers").write_text("cpu io memory pids\n")
    (root / "parent" / "cgroup.subtree_control").write_text("")
    for name in ("cpu.max", "memory.max", "memory.swap.max", "pids.max", "io.weight", "cgroup.procs"):
        (group / name).write_text("")
    return CgroupLayout(v2=root, v1={})


LIMITS = CgroupLimits(cpus=2, memory_bytes=384 << 20, pids_max=260, io_weight=200)


def test_v1_limits_are_written_per_controller(tmp_path: Path) -> None:
    layout = _fake_v1(tmp_path)
    group = vmm_cgroup_create("parent", "vm-1", LIMITS, layout=layout)
    assert group is not None and group.version == 1
    base = {c: tmp_path / c / "parent" / "vm-1" for c in ("cpu", "memory", "pids", "blkio")}
    assert (base["cpu"] / "cpu.cfs_quota_us").read_text() == str(2 * CPU_PERIOD_US)
    assert (base["cpu"] / "cpu.cfs_period_us").read_text() == str(CPU_PERIOD_US)
    assert (base["memory"] / "memory.limit_in_bytes").read_text() == str(384 << 20)
    assert (base["pids"] / "pids.max").read_text() == "260"
    assert (base["blkio"] / "blkio.weight").read_text() == "200"
    assert set(group.procs_files) == {d / "cgroup.procs" for d in base.values()}


def test_v2_limits_and_controller_delegation(tmp_path: Path) -> None:
    layout = _fake_v2(tmp_path)
    group = vmm_cgroup_create("parent", "vm-1", LIMITS, layout=layout)
    assert group is not None and group.version == 2
    path = tmp_path / "parent" / "vm-1"
    assert (path / "cpu.max").read_text() == f"{2 * CPU_PERIOD_US} {CPU_PERIOD_US}"
    assert (path / "memory.max").read_text() == str(384 << 20)
    assert (path / "memory.swap.max").read_text() == "0"
    assert (path / "pids.max").read_text() == "260"
    assert (path / "io.weight").read_text() == "default 200"
    # Controllers are delegated down to the parent (files here are plain, so the last write shows).
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+pids +io"
    assert (tmp_path / "parent" / "cgroup.subtree_control").read_text() == "+cpu +memory +pids +io"
    assert group.procs_files == (path / "cgroup.procs",)


def test_unwritable_cgroups_log_and_run_without_limits(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    layout = CgroupLayout(v2=None, v1={"memory": tmp_path / "missing" / "memory"})
    with caplog.at_level(logging.WARNING, logger="vms.vmm.cgroups"):
        assert vmm_cgroup_create("parent", "vm-1", LIMITS, layout=layout) is None
    assert "runs without CPU/memory/pids limits" in caplog.text


def test_the_cgroup_name_is_safe_and_unique_per_runtime_dir(tmp_path: Path) -> None:
    a = cgroup_name("../evil/..", tmp_path / "a")
    assert "/" not in a and a.startswith(".._evil_..-")
    assert cgroup_name("vm", tmp_path / "a") != cgroup_name("vm", tmp_path / "b")
    with pytest.raises(ValueError):
        vmm_cgroup_dirs("../escape", "vm")


def test_limits_follow_the_vm_size() -> None:
    conf = VmmConfinement(user="", cgroup_parent="x", memory_overhead_mib=100, pids_max=50, io_weight=300)
    spec = VmSpec(
        vm_id="v", runtime_dir=Path("/tmp/v"), kernel=Path("/k"), base_image=Path("/b"), vcpus=2, max_vcpus=4,
        memory_mib=512, max_memory_mib=1024,
    )  # fmt: skip
    assert conf.limits_for(spec) == CgroupLimits(cpus=4, memory_bytes=1124 << 20, pids_max=58, io_weight=300)


# --- the launcher, for real (root; the VMM user from the install script) ---------------------


@pytest.fixture
def run_dir() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("confining a process needs root")
    root = Path(tempfile.mkdtemp(prefix="vmt-conf-", dir="/tmp"))
    root.chmod(0o711)
    yield root / "vm"
    shutil.rmtree(root, ignore_errors=True)


def _spec(runtime_dir: Path) -> VmSpec:
    return VmSpec(
        vm_id="confine-unit", runtime_dir=runtime_dir, kernel=Path("/bin/sleep"), base_image=Path("/bin/sleep"),
        vcpus=1, memory_mib=64, max_memory_mib=64,
    )  # fmt: skip


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def test_the_launcher_joins_the_cgroup_and_drops_to_the_vmm_user_before_exec(run_dir: Path) -> None:
    conf = VmmConfinement(user=VMM_USER, cgroup_parent=TEST_CGROUP_PARENT, memory_overhead_mib=64)
    spec = _spec(run_dir)
    run_dir.mkdir()
    user = conf.vmm_user()
    assert user is not None
    plan = conf.launch_plan(spec, readable=[Path("/bin/sleep")])
    assert plan is not None
    pid = spawn_detached(["sh", "-c", "while :; do sleep 0.2; done", str(run_dir)], run_dir, plan=plan)
    try:
        status = _status(pid)
        assert status["Uid"].split() == [str(user.uid)] * 4
        assert status["Gid"].split() == [str(user.gid)] * 4
        assert status["Groups"].split() == [str(g) for g in user.groups]
        assert status["NoNewPrivs"] == "1"
        assert int(status["CapEff"], 16) == 0
        groups = cgroup_of(pid)
        expected = f"/{TEST_CGROUP_PARENT}/{conf.cgroup_name(spec)}"
        layout = cgroup_layout()
        for controller in [""] if layout.v2 is not None else ["cpu", "memory", "pids"]:
            assert groups[controller] == expected, groups
        if layout.v2 is None:
            memory = layout.v1["memory"] / TEST_CGROUP_PARENT / conf.cgroup_name(spec)
            assert (memory / "memory.limit_in_bytes").read_text().strip() == str((64 + 64) << 20)
        # The runtime directory: ours, the VMM's group may create files, sticky.
        assert run_dir.stat().st_uid == 0 and run_dir.stat().st_gid == user.gid
        assert run_dir.stat().st_mode & 0o7777 == 0o1770
    finally:
        kill_vmm(pid, run_dir, term_timeout=2)
    deadline = time.monotonic() + 5
    while not vmm_cgroup_remove(TEST_CGROUP_PARENT, conf.cgroup_name(spec)):
        assert time.monotonic() < deadline
    assert not any(path.exists() for path in vmm_cgroup_dirs(TEST_CGROUP_PARENT, conf.cgroup_name(spec)))


def test_a_file_the_vmm_user_cannot_read_is_a_clear_error(run_dir: Path) -> None:
    conf = VmmConfinement(user=VMM_USER)
    secret_dir = run_dir.parent / "private"
    secret_dir.mkdir(mode=0o700)
    (secret_dir / "vmlinuz").write_bytes(b"kernel")
    run_dir.mkdir()
    spec = _spec(run_dir)
    plan = conf.launch_plan(spec, readable=[secret_dir / "vmlinuz"])
    with pytest.raises(VmmError) as caught:
        spawn_detached(["sleep", "60"], run_dir, plan=plan)
    assert f"the VMM user {VMM_USER} cannot use {secret_dir / 'vmlinuz'}" in caught.value.message
    assert "SANDBOX_VMM_USER" in caught.value.message
    assert not (run_dir / "vmm.pid").exists()


def test_a_missing_vmm_user_is_a_clear_error() -> None:
    with pytest.raises(VmmError, match="does not exist.*install-system-packages"):
        VmmConfinement(user="msbx-no-such-user").vmm_user()


def test_no_confinement_runs_as_the_caller(run_dir: Path) -> None:
    assert VmmConfinement().launch_plan(_spec(run_dir), readable=[]) is None
