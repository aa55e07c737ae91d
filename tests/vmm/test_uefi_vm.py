"""The UEFI Linux image built here (debootstrap, systemd as init, the agent installed as a
systemd service by install.sh) boots under OVMF on q35 (TCG here) to a running agent; exec
and files work; the sandbox.* settings arrive through SMBIOS OEM strings.

One boot for the whole module: a firmware boot under TCG costs ~35 s on an idle machine."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vms.vmm.agent_client import AgentConnection, AgentTransport, wait_for_agent
from vms.vmm.base import BOOT_UEFI, VmSpec
from vms.vmm.image import ImageArtifacts
from vms.vmm.image_uefi import UefiImageArtifacts, build_uefi_image
from vms.vmm.qemu import QemuDriver

from .agent_ops import agent_get, agent_put, agent_run
from .conftest import IMAGE_DIR, _short_runtime_root
from .installer_checks import INSTALLER_CHECKS

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

AGENT_DIR = Path(__file__).resolve().parents[2] / "guest_agents" / "linux"
UEFI_IMAGE_DIR = Path(os.environ.get("SANDBOX_UEFI_IMAGE_DIR", str(IMAGE_DIR)))


@pytest.fixture(scope="module")
def uefi_image(image: ImageArtifacts) -> UefiImageArtifacts:
    if not Path("/usr/share/OVMF/OVMF_CODE_4M.fd").is_file():
        pytest.skip("needs Debian's ovmf package (requirements/apt-vmm.txt)")
    missing = [tool for tool in ("grub-mkstandalone", "mkfs.vfat", "mcopy", "sgdisk") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (grub-efi-amd64-bin, dosfstools, mtools, gdisk)")
    started = time.monotonic()
    art = build_uefi_image(UEFI_IMAGE_DIR, base_dir=IMAGE_DIR, progress=lambda msg: print(f"[uefi] {msg}"))
    print(f"uefi-image-ready: {time.monotonic() - started:.1f}s")
    return art


@pytest.fixture(scope="module")
def uefi_vm(driver: QemuDriver, uefi_image: UefiImageArtifacts) -> Iterator[tuple[VmSpec, float]]:
    root = _short_runtime_root()
    spec = VmSpec(
        vm_id="uefi",
        runtime_dir=root / "uefi",
        kernel=Path("/nonexistent"),  # unused with firmware boot
        base_image=uefi_image.disk,
        boot_mode=BOOT_UEFI,
        memory_mib=512,
        disk_gib=2,
        cmdline="sandbox.hostname=uefi-guest sandbox.vm_id=42",
    )
    started = time.monotonic()
    driver.launch(spec)
    try:
        wait_for_agent(spec, AgentTransport.VIRTIO_SERIAL, timeout=300)
        boot = time.monotonic() - started
        print(f"uefi-boot-to-agent: {boot:.1f}s")
        yield spec, boot
    finally:
        driver.cleanup(spec)
        if root.exists():
            os.rmdir(root)


def test_the_uefi_image_is_a_gpt_disk_with_an_esp(uefi_image: UefiImageArtifacts) -> None:
    with open(uefi_image.disk, "rb") as fh:
        fh.seek(512)
        assert fh.read(8) == b"EFI PART"
    manifest = (uefi_image.disk.parent / "manifest.json").read_text()
    assert '"boot_mode": "uefi"' in manifest


def test_it_boots_through_ovmf_and_the_agent_answers(uefi_vm: tuple[VmSpec, float]) -> None:
    spec, _ = uefi_vm
    with AgentConnection.open(spec.runtime_dir / "agent.sock", AgentTransport.VIRTIO_SERIAL, timeout=30) as conn:
        ping = conn.ping()
        assert ping["hostname"] == "uefi-guest"  # from the SMBIOS OEM strings
        result, out = agent_run(conn, shell="cat /sys/firmware/efi/fw_platform_size; findmnt -no SOURCE /")
        assert result["exit_code"] == 0
        assert out.decode().split() == ["64", "/dev/vda2"]  # a UEFI boot, root on partition 2
    serial = (spec.runtime_dir / "serial.log").read_bytes()
    assert b"GRUB" in serial and b"sandbox: init done" in serial


def test_systemd_runs_the_agent_as_the_installers_service(uefi_vm: tuple[VmSpec, float]) -> None:
    spec, _ = uefi_vm
    with AgentConnection.open(spec.runtime_dir / "agent.sock", AgentTransport.VIRTIO_SERIAL, timeout=30) as conn:
        result, out = agent_run(
            conn,
            shell="readlink /proc/1/exe; systemctl is-active sandbox-agent.service;"
            " systemctl show -p MainPID --value sandbox-agent.service; ps -o ppid= -p $$;"
            " systemctl show -p FragmentPath --value sandbox-agent.service",
        )
        assert result["exit_code"] == 0, out
        init, state, main_pid, parent, unit = out.decode().split()
        assert init == "/usr/lib/systemd/systemd" and state == "active"
        assert parent == main_pid  # this very command was started by the service's process
        assert unit == "/etc/systemd/system/sandbox-agent.service"  # written by install.sh
        installed = agent_get(conn, unit)[0].decode()
        assert "ExecStart=/usr/bin/python3 -u -m sandbox_agent" in installed
        assert "Environment=PYTHONPATH=/usr/local/lib/sandbox" in installed
        # install.sh compiled the agent inside the image (chroot), so it starts from byte code.
        result, out = agent_run(conn, shell="ls /usr/local/lib/sandbox/__pycache__")
        assert result["exit_code"] == 0 and out.startswith(b"sandbox_agent.cpython-"), out
        # The agent answers before the rest of the boot is done; once it is, nothing failed
        # (the masked units are not missed) and no job is left.
        result, out = agent_run(
            conn,
            shell="timeout 300 systemctl is-system-running --wait; systemctl --failed --plain --no-legend;"
            " systemctl list-jobs --no-legend",
            wait=330,
        )
        assert result["exit_code"] == 0 and out.decode().split("\n") == ["running", ""], out.decode()


def test_exec_and_files_work_on_the_uefi_guest(uefi_vm: tuple[VmSpec, float]) -> None:
    spec, _ = uefi_vm
    payload = os.urandom(300_000)
    with AgentConnection.open(spec.runtime_dir / "agent.sock", AgentTransport.VIRTIO_SERIAL, timeout=30) as conn:
        written = agent_put(conn, "/root/blob.bin", payload)
        assert written["sha256"] == hashlib.sha256(payload).hexdigest()
        result, out = agent_run(conn, argv=["sha256sum", "/root/blob.bin"])
        assert result["exit_code"] == 0 and out.split()[0].decode() == written["sha256"]
        back, sha = agent_get(conn, "/root/blob.bin")
        assert back == payload and sha == written["sha256"]
        result, out = agent_run(conn, shell="cat; exit 3", stdin=b"hello uefi")
        assert result["exit_code"] == 3 and out == b"hello uefi"


def test_the_agent_installer_runs_inside_the_vm(uefi_vm: tuple[VmSpec, float]) -> None:
    """guest_agents/linux/install.sh copied in through the agent's file operations (what the
    files API uses) and run against fresh directory layouts in the guest."""
    spec, _ = uefi_vm
    with AgentConnection.open(spec.runtime_dir / "agent.sock", AgentTransport.VIRTIO_SERIAL, timeout=30) as conn:
        for name in ("install.sh", "sandbox_agent.py", "sandbox-agent.service"):
            agent_put(conn, f"/root/inst/{name}", (AGENT_DIR / name).read_bytes(), mkdirs=True)
        agent_put(conn, "/root/checks.sh", INSTALLER_CHECKS.encode())
        result, out = agent_run(
            conn,
            shell="rm -rf /root/work && mkdir /root/work && sh /root/checks.sh /root/inst /root/work",
            wait=300,  # dozens of installer runs: minutes under TCG on a busy machine
        )
        assert result["exit_code"] == 0 and b"INSTALLER-OK" in out, out.decode(errors="replace")
