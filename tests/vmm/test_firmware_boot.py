"""Firmware (UEFI) boot without booting: the QEMU command line (q35 + OVMF pflash, Hyper-V
enlightenments and CD-ROMs for Windows) and cloud-hypervisor's firmware payload, sent to
the fake VMM, which validates every request against the OpenAPI spec."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vms.vmm.base import BOOT_UEFI, OS_WINDOWS, VmmError, VmSpec
from vms.vmm.cloud_hypervisor import ChApiClient, CloudHypervisorDriver, build_vm_config
from vms.vmm.qemu import HYPERV_ENLIGHTENMENTS, HYPERV_KVM_ENLIGHTENMENTS, QemuDriver

from .test_cloud_hypervisor import FAKE_BIN, images, make_spec, short_dir  # noqa: F401 - fixtures

CMDLINE = "sandbox.hostname=web-1 sandbox.vm_id=abc sandbox.ip=10.0.0.5/24"


def _spec(tmp_path: Path, **kw: object) -> VmSpec:
    base = tmp_path / "disk.raw"
    base.write_bytes(b"\0" * 4096)
    args: dict[str, object] = {
        "vm_id": "fw",
        "runtime_dir": tmp_path / "rt",
        "kernel": tmp_path / "unused",
        "base_image": base,
        "boot_mode": BOOT_UEFI,
        "cmdline": CMDLINE,
    }
    args.update(kw)
    return VmSpec(**args)  # type: ignore[arg-type]


def _value(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == flag]


def test_direct_boot_keeps_microvm(tmp_path: Path) -> None:
    spec = dataclasses.replace(_spec(tmp_path), boot_mode="kernel")
    argv = QemuDriver().build_argv(spec, acceleration="tcg")
    assert _value(argv, "-M")[0].startswith("microvm,")
    assert "-kernel" in argv and not any("pflash" in a for a in argv)
    assert "virtio-blk-device,drive=root" in argv


def test_uefi_boot_uses_q35_ovmf_and_a_per_vm_variable_store(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    driver = QemuDriver()
    argv = driver.build_argv(spec, acceleration="tcg")
    assert _value(argv, "-M")[0].startswith("q35,")
    assert "-kernel" not in argv and "-append" not in argv and "-initrd" not in argv
    drives = _value(argv, "-drive")
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={Path(driver.ovmf_code).resolve()}" in drives
    assert f"if=pflash,format=raw,unit=1,file={spec.runtime_dir.resolve() / 'OVMF_VARS.fd'}" in drives
    devices = _value(argv, "-device")
    assert "virtio-blk-pci,drive=root,bootindex=0" in devices
    assert "virtio-serial-pci,max_ports=4" in devices and "virtio-rng-pci" in devices
    # The guest's boot loader owns the kernel command line: sandbox.* travel as OEM strings.
    assert _value(argv, "-smbios") == [
        "type=11,value=sandbox.hostname=web-1,value=sandbox.vm_id=abc,value=sandbox.ip=10.0.0.5/24"
    ]
    assert _value(argv, "-cpu") == ["max"]  # no Hyper-V flags for Linux


@pytest.mark.skipif(not Path("/usr/share/OVMF/OVMF_VARS_4M.fd").is_file(), reason="needs Debian's ovmf")
def test_prepare_copies_the_variable_store_once(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    driver = QemuDriver()
    driver.prepare(spec)
    store = spec.runtime_dir / "OVMF_VARS.fd"
    assert store.read_bytes() == Path(driver.ovmf_vars).read_bytes()
    store.write_bytes(b"boot entries the guest wrote")
    driver.prepare(spec)  # idempotent: the VM's NVRAM survives restarts
    assert store.read_bytes() == b"boot entries the guest wrote"


def test_prepare_without_ovmf_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(VmmError, match="apt-get install ovmf"):
        QemuDriver(ovmf_code=str(tmp_path / "none.fd")).prepare(_spec(tmp_path))


def test_windows_gets_hyperv_enlightenments_and_the_driver_cdrom(tmp_path: Path) -> None:
    iso = tmp_path / "virtio-win,1.iso"
    iso.write_bytes(b"")
    spec = _spec(tmp_path, os_type=OS_WINDOWS, cdroms=(str(iso),))
    driver = QemuDriver()
    tcg = driver.build_argv(spec, acceleration="tcg")
    assert _value(tcg, "-cpu") == ["max," + ",".join(HYPERV_ENLIGHTENMENTS)]
    assert "hv_relaxed" in HYPERV_ENLIGHTENMENTS and "hv_spinlocks=0x1fff" in HYPERV_ENLIGHTENMENTS
    kvm = driver.build_argv(spec, acceleration="kvm")
    assert _value(kvm, "-cpu") == ["host," + ",".join(HYPERV_ENLIGHTENMENTS + HYPERV_KVM_ENLIGHTENMENTS)]
    assert "kvm-pit.lost_tick_policy=delay" in _value(kvm, "-global")
    assert "base=localtime,driftfix=slew" in _value(tcg, "-rtc")
    escaped = str(iso.resolve()).replace(",", ",,")
    assert f"id=cd0,file={escaped},format=raw,if=none,media=cdrom,readonly=on" in _value(tcg, "-drive")
    assert "ide-cd,drive=cd0,bus=ide.1,bootindex=1" in _value(tcg, "-device")


def test_windows_cannot_boot_without_firmware(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="UEFI"):
        _spec(tmp_path, os_type=OS_WINDOWS, boot_mode="kernel")
    with pytest.raises(ValueError, match="boot mode"):
        _spec(tmp_path, boot_mode="bios")


def test_spec_round_trips_through_json(tmp_path: Path) -> None:
    spec = _spec(tmp_path, os_type=OS_WINDOWS, cdroms=("/isos/virtio-win.iso",))
    assert VmSpec.from_json(spec.to_json()) == spec


# ----- cloud-hypervisor ------------------------------------------------------------------


def test_ch_firmware_payload_replaces_the_kernel(short_dir: Path, images: tuple[Path, Path]) -> None:  # noqa: F811
    spec = make_spec(short_dir, images, boot_mode=BOOT_UEFI, cmdline=CMDLINE, os_type=OS_WINDOWS)
    config = build_vm_config(spec, firmware="/opt/CLOUDHV.fd")
    assert config["payload"] == {"firmware": "/opt/CLOUDHV.fd"}
    assert config["platform"] == {"oem_strings": CMDLINE.split()}
    assert config["cpus"]["kvm_hyperv"] is True
    with pytest.raises(VmmError, match="SANDBOX_CLOUD_HYPERVISOR_FIRMWARE"):
        build_vm_config(spec)
    linux = build_vm_config(make_spec(short_dir, images))
    assert "firmware" not in linux["payload"] and "platform" not in linux
    assert "kvm_hyperv" not in linux["cpus"]


@pytest.mark.parametrize("os_type", ["linux", "windows"])
def test_ch_firmware_boot_is_accepted_by_the_spec_checking_fake(
    short_dir: Path,  # noqa: F811
    images: tuple[Path, Path],  # noqa: F811
    os_type: str,
) -> None:
    firmware = short_dir / "CLOUDHV.fd"
    firmware.write_bytes(b"fake firmware")
    spec = make_spec(short_dir, images, boot_mode=BOOT_UEFI, cmdline=CMDLINE, os_type=os_type)
    driver = CloudHypervisorDriver(binary=str(FAKE_BIN), firmware=str(firmware))
    try:
        driver.prepare(spec)
        driver.launch(spec, timeout=20)
        with ChApiClient(spec.runtime_dir / "api.sock", timeout=5.0) as api:
            info = api.vm_info()
        assert info["state"] == "Running"
        config = info["config"]
        assert config["payload"] == {"firmware": str(firmware)}
        assert config["platform"]["oem_strings"] == CMDLINE.split()
        assert config["cpus"].get("kvm_hyperv", False) is (os_type == "windows")
    finally:
        driver.cleanup(spec)


def test_ch_refuses_a_missing_firmware_file_like_the_real_binary(
    short_dir: Path,  # noqa: F811
    images: tuple[Path, Path],  # noqa: F811
) -> None:
    spec = make_spec(short_dir, images, boot_mode=BOOT_UEFI)
    driver = CloudHypervisorDriver(binary=str(FAKE_BIN), firmware=str(short_dir / "missing.fd"))
    try:
        driver.prepare(spec)
        with pytest.raises(VmmError):
            driver.launch(spec, timeout=20)
    finally:
        driver.cleanup(spec)
