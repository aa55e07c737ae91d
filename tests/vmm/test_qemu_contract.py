"""QemuDriver's side of the Driver contract that needs no VM: capabilities, acceleration
given as an argument, and qemu-img layer work in the driver package (``layer_rebase``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vms.vmm import qemu
from vms.vmm.base import AgentTransport, NicDevice, VmmError, VmSpec
from vms.vmm.qemu import TCG_TB_SIZE_MIB, QemuDriver
from vms.vmm.snapshot import backing_chain, layer_rebase

needs_qemu_img = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None, reason="needs qemu-img and qemu-io"
)


def test_qemu_declares_what_microvm_can_do() -> None:
    caps = QemuDriver().capabilities()
    assert caps.live_resize is False and caps.memory_hotplug_step_mib == 0 and caps.nic_hotplug is False
    assert caps.memory_snapshot is True and caps.disk_only_snapshot is True
    assert caps.shared_disk_layers is True
    assert caps.agent_transport is AgentTransport.VIRTIO_SERIAL


def test_acceleration_is_a_constructor_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_ACCEL", "kvm")  # the environment is not the driver's business
    spec = VmSpec(vm_id="a", runtime_dir=tmp_path, kernel=tmp_path / "k", base_image=tmp_path / "b")
    driver = QemuDriver(accel="TCG")
    assert driver.accel == "tcg"
    argv = driver.build_argv(spec, acceleration="tcg")
    assert argv[argv.index("-accel") + 1].startswith("tcg,")
    with pytest.raises(ValueError):
        QemuDriver(accel="whpx")


def _qemu_io(image: Path, command: str, fmt: str = "qcow2") -> None:
    subprocess.run(["qemu-io", "-f", fmt, "-c", command, str(image)], check=True, capture_output=True, timeout=30)


def _raw_content(image: Path, out: Path) -> bytes:
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(out)], check=True, timeout=30)
    return out.read_bytes()


@needs_qemu_img
def test_layer_rebase_merges_a_layer_without_changing_the_image(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * (1 << 20))
    _qemu_io(base, "write -P 0x11 0 64k", fmt="raw")
    middle, top = tmp_path / "middle.qcow2", tmp_path / "top.qcow2"
    for image, backing, fmt in ((middle, base, "raw"), (top, middle, "qcow2")):
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", fmt, str(image), "1M"],
            check=True,
            timeout=30,
        )
    _qemu_io(middle, "write -P 0x22 64k 64k")
    _qemu_io(top, "write -P 0x33 128k 64k")
    before = _raw_content(top, tmp_path / "before.raw")

    layer_rebase(top, base)  # the middle layer is about to be deleted
    assert backing_chain(top) == [str(base)]
    assert _raw_content(top, tmp_path / "after.raw") == before

    layer_rebase(top, None)  # standalone
    assert backing_chain(top) == []
    assert _raw_content(top, tmp_path / "alone.raw") == before


@needs_qemu_img
def test_layer_rebase_reports_qemu_img_errors(tmp_path: Path) -> None:
    with pytest.raises(VmmError) as err:
        layer_rebase(tmp_path / "missing.qcow2", None)
    assert err.value.message == "merging the snapshot layer failed" and err.value.details["stderr"]  # type: ignore[index]
    with pytest.raises(VmmError, match="cannot run"):
        layer_rebase(tmp_path / "missing.qcow2", None, qemu_img=str(tmp_path / "no-qemu-img"))


def _append(argv: list[str]) -> list[str]:
    return argv[argv.index("-append") + 1].split()


def test_the_guest_kernel_is_told_to_keep_an_idle_guest_quiet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under TCG the TSC is trusted (else the clocksource watchdog falls back to jiffies and a
    periodic 250 Hz tick) and mitigations are off (TCG does not speculate); under KVM the guest
    keeps both defaults. The words of the VM's own command line come last, so they win."""
    monkeypatch.setattr(qemu, "host_uses_tsc", lambda: True)
    spec = VmSpec(
        vm_id="a", runtime_dir=tmp_path, kernel=tmp_path / "k", base_image=tmp_path / "b", cmdline="mitigations=auto"
    )
    tcg = _append(QemuDriver().build_argv(spec, acceleration="tcg"))
    kvm = _append(QemuDriver().build_argv(spec, acceleration="kvm"))
    for words in (tcg, kvm):
        for word in ("nowatchdog", "cryptomgr.notests", "nokaslr", "sysctl.vm.compaction_proactiveness=0"):
            assert word in words
        assert words[-1] == "mitigations=auto"
    assert "tsc=reliable" in tcg and "mitigations=off" in tcg
    assert any(word.startswith("tsc_early_khz=") for word in tcg)
    assert tcg.index("mitigations=off") < tcg.index("mitigations=auto")
    assert "tsc=reliable" not in kvm and "mitigations=off" not in kvm
    assert not any(word.startswith("tsc_early_khz=") for word in kvm)


def test_guest_memory_is_offered_to_ksm_and_the_translation_cache_is_bounded(tmp_path: Path) -> None:
    spec = VmSpec(vm_id="a", runtime_dir=tmp_path, kernel=tmp_path / "k", base_image=tmp_path / "b")
    argv = QemuDriver().build_argv(spec, acceleration="tcg")
    assert "mem-merge=on" in argv[argv.index("-M") + 1].split(",")
    accel = argv[argv.index("-accel") + 1].split(",")
    assert accel[0] == "tcg" and f"tb-size={TCG_TB_SIZE_MIB}" in accel


def test_a_guest_trusts_its_tsc_only_when_the_host_keeps_time_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = VmSpec(vm_id="a", runtime_dir=tmp_path, kernel=tmp_path / "k", base_image=tmp_path / "b")
    monkeypatch.setattr(qemu, "host_uses_tsc", lambda: False)
    assert "tsc=reliable" not in _append(QemuDriver().build_argv(spec, acceleration="tcg"))
    monkeypatch.setattr(qemu, "host_uses_tsc", lambda: True)
    assert "tsc=reliable" in _append(QemuDriver().build_argv(spec, acceleration="tcg"))


def test_the_guests_mtu_is_the_virtio_nets_host_mtu(tmp_path: Path) -> None:
    nic = NicDevice(tap="tap1", mac="52:54:00:00:00:02", device_id="net1")
    base = {"vm_id": "a", "runtime_dir": tmp_path, "kernel": tmp_path / "k", "base_image": tmp_path / "b"}
    spec = VmSpec(**base, tap="tap0", mac="52:54:00:00:00:01", extra_nics=(nic,), nic_mtu=1450)  # type: ignore[arg-type]
    nets = [arg for arg in QemuDriver().build_argv(spec, acceleration="tcg") if arg.startswith("virtio-net")]
    assert len(nets) == 2 and all("host_mtu=1450" in net.split(",") for net in nets), nets
    # 1500 is given too: the device always offers the MTU feature (snapshots restore anywhere).
    plain = VmSpec(**base, tap="tap0", mac="52:54:00:00:00:01")  # type: ignore[arg-type]
    nets = [arg for arg in QemuDriver().build_argv(plain, acceleration="tcg") if arg.startswith("virtio-net")]
    assert nets and all("host_mtu=1500" in net.split(",") for net in nets), nets
