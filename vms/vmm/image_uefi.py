"""Build the UEFI Linux guest image: a GPT disk that firmware (OVMF, CLOUDHV.fd) boots, with
systemd as init and the agent installed as a systemd service (no Django).

Made without loop mounts and without touching the host's boot loader:

- the root filesystem is its own ``debootstrap --variant=minbase`` of Debian bookworm from the
  mirror apt uses (the same source as the direct-boot image) with ``systemd``/``systemd-sysv``
  as init and python3; the agent goes in through ``guest_agents/linux/install.sh --init
  systemd`` (the installer users run) as ``sandbox-agent.service``; units that wait or are of
  no use in a sandbox are masked (getty, logind, udev settle, network wait-online, apt and
  scrub timers, first-boot prompts); ``sandbox-guest-setup.service`` applies the ``sandbox.*``
  settings (hostname, network) from the kernel command line and from SMBIOS OEM strings,
  because with firmware boot GRUB's fixed command line reaches the kernel, not the host's;
  ``mkfs.ext4 -d`` makes partition 2;
- partition 1, ``ESP`` (FAT32, 64 MiB): ``EFI/BOOT/BOOTX64.EFI``, a standalone GRUB made by
  ``grub-mkstandalone`` from Debian's ``grub-efi-amd64-bin`` with its ``grub.cfg`` built in
  (the removable-media path, so no NVRAM boot entry is needed), plus ``sandbox/vmlinuz`` and
  ``sandbox/initramfs.cpio.gz``, the Debian cloud kernel and the busybox initramfs of the
  direct-boot image (built or taken from its cache), which mounts partition 2 and hands over
  to systemd; filled with mtools.

Cached under ``out_dir/uefi-<sha256 of inputs>/disk.raw`` (inputs: the base image digest for
the kernel and initramfs, the package list and mirror, the agent, installer and unit, GRUB's
modules, grub.cfg and the files written into the root), built in a temporary directory and
renamed into place, serialised by the same lock file as ``build_image``. Needs root
(debootstrap).

CLI: ``python -m vms.vmm.image_uefi OUT_DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .image import (
    GUEST_SETUP,
    POWERBTN,
    SUITE,
    ImageArtifacts,
    ImageBuildError,
    _build_lock,
    _digest,
    _run,
    build_image,
    cached_image,
    debian_mirror,
    debootstrap,
    install_files,
    make_ext4,
    passwordless_root,
    trim_rootfs,
)
from .snapshot import sha256_file

UEFI_BUILDER_VERSION = "2"
ESP_MIB = 64
ROOT_MIB = 1024
ALIGN_MIB = 1  # first partition starts at 1 MiB; GPT backup needs the last 33 sectors
GRUB_MODULE_DIR = Path("/usr/lib/grub/x86_64-efi")
GRUB_MODULES = "part_gpt fat ext2 normal linux search search_fs_file serial terminal echo test"
STEP_TIMEOUT = 600
ROOT_DEVICE = "/dev/vda2"
# systemd-sysv makes systemd /sbin/init (and poweroff/reboot its commands); e2fsprogs for fsck.
UEFI_PACKAGES: tuple[str, ...] = ("systemd", "systemd-sysv", "python3", "procps", "iproute2", "e2fsprogs")
AGENT_DIR = Path(__file__).resolve().parents[2] / "guest_agents" / "linux"
INSTALLER_FILES = ("install.sh", "sandbox_agent.py", "sandbox-agent.service")

GRUB_CFG = f"""\
# microvm-sandbox UEFI image: boot the kernel on the ESP at once, console on the serial port.
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
search --no-floppy --file --set=root /sandbox/vmlinuz
linux /sandbox/vmlinuz root={ROOT_DEVICE} console=ttyS0 rw panic=-1 quiet loglevel=4
initrd /sandbox/initramfs.cpio.gz
boot
"""

# Read the sandbox.* words from SMBIOS type 11 as well as from /proc/cmdline. Each OEM
# string is NUL-terminated; the structure header in front of the first one is skipped by
# matching only "sandbox.<key>=<value>" runs.
_OEM_ARGS = r"""sandbox_args() {
    cat /proc/cmdline
    for raw in /sys/firmware/dmi/entries/11-*/raw; do
        [ -r "$raw" ] && tr '\0' '\n' < "$raw" | grep -ao 'sandbox\.[a-z_]*=[^ ]*'
    done
}
"""
GUEST_SETUP_SCRIPT = (
    "#!/bin/sh\n# microvm-sandbox: hostname and network from the sandbox.* settings (run by systemd).\n"
    "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    + _OEM_ARGS
    + "args=$(sandbox_args)\n"  # once: every process started costs a lot under TCG
    + GUEST_SETUP.replace("$(sandbox_args)", "$args")
    # Straight to the console (journald forwards the lines above later, when it gets to it):
    # the marker is there by the time the agent, ordered after this unit, answers.
    + 'echo "sandbox: init done" >/dev/console\n'
)

GUEST_SETUP_UNIT = """\
[Unit]
Description=microvm-sandbox guest settings (hostname, network)
# Early and without the default dependencies, before the agent: a VM is running when its
# agent answers, and by then it has its hostname and address (as with the direct-boot image).
DefaultDependencies=no
Before=sysinit.target sandbox-agent.service

[Service]
Type=oneshot
# On the agent's path: first for the CPU while the system boots, like the agent.
StartupCPUWeight=1000
RemainAfterExit=yes
ExecStart=/usr/local/lib/sandbox/guest-setup
StandardOutput=journal+console
TimeoutStartSec=30

[Install]
WantedBy=sysinit.target
"""

CONSOLE_UNIT = """\
[Unit]
Description=Root shell on the serial console (access is controlled on the host)
After=sandbox-guest-setup.service

[Service]
Environment=HOME=/root TERM=vt100
WorkingDirectory=/root
ExecStart=/bin/bash -l
StandardInput=tty
StandardOutput=tty
TTYPath=/dev/ttyS0
TTYReset=yes
TTYVHangup=yes
Restart=always
RestartSec=0

[Install]
WantedBy=multi-user.target
"""

POWERBTN_UNIT = """\
[Unit]
Description=Power off when the ACPI power button is pressed (QEMU system_powerdown)
DefaultDependencies=no
After=local-fs.target
Conflicts=shutdown.target
Before=shutdown.target

[Service]
ExecStart=/usr/bin/python3 -u /usr/local/lib/sandbox/powerbtn.py
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
"""

# Units masked (linked to /dev/null). Under TCG every unit started early competes with the
# agent for the one vCPU, so the boot runs only what a sandbox uses: journald, tmpfiles, the
# agent, the guest settings, the console and the power button.
MASKED_UNITS: tuple[str, ...] = (
    # wait for things a sandbox does not have, or prompt on the console
    "getty.target",
    "serial-getty@ttyS0.service",
    "systemd-logind.service",  # needs D-Bus; the power button is handled by sandbox-powerbtn
    "systemd-networkd-wait-online.service",
    "systemd-udev-settle.service",
    "systemd-firstboot.service",
    # on the agent's path to local-fs.target, with nothing to do here: the initramfs mounts
    # the root read-write, debootstrap created the system users, devtmpfs makes /dev
    "systemd-remount-fs.service",
    "systemd-sysusers.service",
    "systemd-tmpfiles-setup-dev.service",
    # no kernel modules in the root (the initramfs loads the few needed), no kmod
    "systemd-modules-load.service",
    "modprobe@configfs.service",
    "modprobe@dm_mod.service",
    "modprobe@drm.service",
    "modprobe@efi_pstore.service",
    "modprobe@fuse.service",
    "modprobe@loop.service",
    # kernel interfaces and bookkeeping nobody reads in a sandbox
    "dev-hugepages.mount",
    "dev-mqueue.mount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount",
    "proc-sys-fs-binfmt_misc.automount",
    "systemd-binfmt.service",
    "systemd-pstore.service",
    "systemd-sysctl.service",
    "systemd-random-seed.service",  # virtio-rng seeds the kernel
    "systemd-journal-flush.service",  # the journal stays in memory
    "systemd-update-utmp.service",
    "systemd-update-utmp-runlevel.service",
    "systemd-user-sessions.service",
    # periodic jobs
    "systemd-timesyncd.service",
    "systemd-tmpfiles-clean.timer",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
)
# systemd runs every generator before it starts any unit; these have nothing to find here
# (no encrypted, verity or integrity volumes, no SysV scripts or rc.local, no resume device,
# the GPT root is mounted already, the console shell is a unit of the image, and the fixed
# GRUB command line carries no systemd.* words). Disabled by /dev/null links in /etc.
MASKED_GENERATORS: tuple[str, ...] = (
    "systemd-cryptsetup-generator",
    "systemd-debug-generator",
    "systemd-getty-generator",
    "systemd-gpt-auto-generator",
    "systemd-hibernate-resume-generator",
    "systemd-integritysetup-generator",
    "systemd-rc-local-generator",
    "systemd-run-generator",
    "systemd-system-update-generator",
    "systemd-sysv-generator",
    "systemd-veritysetup-generator",
)
ENABLED_UNITS: dict[str, str] = {
    "sandbox-guest-setup.service": "sysinit.target.wants",
    "sandbox-console.service": "multi-user.target.wants",
    "sandbox-powerbtn.service": "multi-user.target.wants",
}

ROOT_FILES: dict[str, tuple[str, int]] = {
    "usr/local/lib/sandbox/guest-setup": (GUEST_SETUP_SCRIPT, 0o755),
    "usr/local/lib/sandbox/powerbtn.py": (POWERBTN.replace("/usr/local/sbin/poweroff", "/usr/sbin/poweroff"), 0o644),
    "etc/systemd/system/sandbox-guest-setup.service": (GUEST_SETUP_UNIT, 0o644),
    "etc/systemd/system/sandbox-console.service": (CONSOLE_UNIT, 0o644),
    "etc/systemd/system/sandbox-powerbtn.service": (POWERBTN_UNIT, 0o644),
    # Bounded logs in memory; short timeouts so a stuck unit cannot hold a boot or a stop.
    "etc/systemd/journald.conf.d/sandbox.conf": ("[Journal]\nStorage=volatile\nRuntimeMaxUse=16M\n", 0o644),
    "etc/systemd/system.conf.d/sandbox.conf": (
        "[Manager]\nDefaultTimeoutStartSec=30s\nDefaultTimeoutStopSec=10s\n",
        0o644,
    ),
    # The initramfs mounts the root read-write; no fstab entry, so systemd waits for no device.
    "etc/fstab": (f"# {ROOT_DEVICE} (root) is mounted read-write by the initramfs\n", 0o644),
    "etc/hostname": ("sandbox\n", 0o644),
    "etc/hosts": ("127.0.0.1\tlocalhost\n127.0.1.1\tsandbox\n::1\tlocalhost ip6-localhost\n", 0o644),
    # Empty: systemd makes a new machine-id on each VM's first boot (clones: identity_set).
    "etc/machine-id": ("", 0o444),
}


@dataclass(frozen=True)
class UefiImageArtifacts:
    """A built UEFI disk (``disk``: raw GPT image) and the digest naming its cache directory."""

    disk: Path
    digest: str
    base: ImageArtifacts


def uefi_inputs(base: ImageArtifacts, mirror: str) -> dict[str, object]:
    """Everything the UEFI disk depends on; its canonical JSON hash is the cache key."""
    grub = hashlib.sha256()
    for mod in sorted(GRUB_MODULE_DIR.glob("*.mod")):
        grub.update(mod.name.encode() + hashlib.sha256(mod.read_bytes()).digest())
    return {
        "builder_version": UEFI_BUILDER_VERSION,
        "base_digest": base.digest,
        "mirror": mirror,
        "packages": sorted(UEFI_PACKAGES),
        "esp_mib": ESP_MIB,
        "root_mib": ROOT_MIB,
        "grub_modules": GRUB_MODULES,
        "grub_sha256": grub.hexdigest(),
        "grub_cfg_sha256": hashlib.sha256(GRUB_CFG.encode()).hexdigest(),
        "root_files_sha256": hashlib.sha256(json.dumps(ROOT_FILES, sort_keys=True).encode()).hexdigest(),
        "masked": sorted(MASKED_UNITS),
        "masked_generators": sorted(MASKED_GENERATORS),
        "enabled": ENABLED_UNITS,
        "installer_sha256": {name: sha256_file(AGENT_DIR / name) for name in INSTALLER_FILES},
    }


def cached_uefi_image(out_dir: Path, *, base_dir: Path | None = None) -> UefiImageArtifacts | None:
    """The UEFI disk for the current inputs if it is already built, without building."""
    base = cached_image(base_dir or out_dir)
    if base is None:
        return None
    digest = _digest(uefi_inputs(base, debian_mirror()))
    directory = out_dir / f"uefi-{digest}"
    if not (directory / "manifest.json").is_file():
        return None
    return UefiImageArtifacts(disk=directory / "disk.raw", digest=digest, base=base)


def build_uefi_image(
    out_dir: Path, *, base_dir: Path | None = None, progress: Callable[[str], None] = lambda _msg: None
) -> UefiImageArtifacts:
    """Build (or reuse from cache) the UEFI Linux disk under ``out_dir``, with the kernel and
    initramfs of the base image in ``base_dir`` (default ``out_dir``; built first if needed).
    Needs root (debootstrap) and the Debian mirror apt uses. Raises ``ImageBuildError``."""
    out_dir = out_dir.resolve()
    base = build_image((base_dir or out_dir).resolve(), progress=progress)
    if not GRUB_MODULE_DIR.is_dir():
        raise ImageBuildError("GRUB for EFI not installed (apt-get install grub-efi-amd64-bin)")
    mirror = debian_mirror()
    inputs = uefi_inputs(base, mirror)
    digest = _digest(inputs)
    final = out_dir / f"uefi-{digest}"
    if (final / "manifest.json").is_file():  # complete once renamed into place (see build_image)
        progress(f"UEFI image {digest[:12]} already built")
        return UefiImageArtifacts(disk=final / "disk.raw", digest=digest, base=base)
    with _build_lock(out_dir):
        if (final / "manifest.json").is_file():
            progress(f"UEFI image {digest[:12]} already built")
            return UefiImageArtifacts(disk=final / "disk.raw", digest=digest, base=base)
        started = time.monotonic()
        tmp = out_dir / f".tmp-uefi-{digest[:12]}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            _build_root(out_dir, tmp / "root.ext4", tmp / "root.d", mirror, progress=progress)
            _build_disk(tmp, base, progress=progress)
            disk = tmp / "disk.raw"
            manifest = {
                "digest": digest,
                "inputs": inputs,
                "boot_mode": "uefi",
                "init": "systemd",
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": round(time.monotonic() - started, 1),
                "disk": {"bytes": disk.stat().st_size, "allocated": disk.stat().st_blocks * 512},
                "sha256": sha256_file(disk),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        progress(f"UEFI image {digest[:12]} built in {time.monotonic() - started:.0f}s at {final}")
        return UefiImageArtifacts(disk=final / "disk.raw", digest=digest, base=base)


def _debootstrapped(out_dir: Path, root: Path, mirror: str, *, progress: Callable[[str], None]) -> None:
    """The debootstrap tree at ``root``, unpacked from ``out_dir/debootstrap-<key>.tar`` when
    an earlier build of the same suite, packages and mirror left one there (a change of the
    agent or the image's files then costs seconds, not a debootstrap); only the newest such
    tree is kept."""
    key = _digest({"suite": SUITE, "variant": "minbase", "packages": sorted(UEFI_PACKAGES), "mirror": mirror})
    tar = out_dir / f"debootstrap-{key[:16]}.tar"
    tar_argv = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*"]
    if tar.is_file():
        root.mkdir(parents=True)
        _run([*tar_argv, "-xpf", str(tar), "-C", str(root)], progress=progress, timeout=STEP_TIMEOUT, step="untar")
        return
    debootstrap(root, UEFI_PACKAGES, mirror, progress=progress)
    part = tar.with_name(tar.name + ".part")
    _run([*tar_argv, "-cf", str(part), "-C", str(root), "."], progress=progress, timeout=STEP_TIMEOUT, step="tar")
    os.replace(part, tar)
    for old in out_dir.glob("debootstrap-*.tar*"):
        if old != tar:
            old.unlink()


def _build_root(out_dir: Path, out: Path, root: Path, mirror: str, *, progress: Callable[[str], None]) -> None:
    _debootstrapped(out_dir, root, mirror, progress=progress)
    progress("customising the systemd root")
    install_files(root, ROOT_FILES)
    # The agent as users install it: the project's installer, its systemd unit, no start.
    _run(
        ["sh", str(AGENT_DIR / "install.sh"), "--destdir", str(root), "--init", "systemd", "--no-start"],
        progress=progress,
        timeout=STEP_TIMEOUT,
        step="install.sh",
    )
    units = root / "etc/systemd/system"
    for unit in MASKED_UNITS:
        link = units / unit
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to("/dev/null")
    generators = root / "etc/systemd/system-generators"
    generators.mkdir(parents=True, exist_ok=True)
    for name in MASKED_GENERATORS:
        (generators / name).symlink_to("/dev/null")
    for unit, wants in ENABLED_UNITS.items():
        (units / wants).mkdir(parents=True, exist_ok=True)
        link = units / wants / unit
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(f"../{unit}")
    passwordless_root(root)
    trim_rootfs(root)
    make_ext4(root, out, ROOT_MIB, label="sandbox-root", progress=progress)
    shutil.rmtree(root)


def _build_disk(tmp: Path, base: ImageArtifacts, *, progress: Callable[[str], None]) -> None:
    def run(argv: list[str], step: str) -> None:
        _run(argv, progress=progress, timeout=STEP_TIMEOUT, step=step)

    # 1. GRUB as one EFI binary with its configuration inside.
    cfg = tmp / "grub.cfg"
    cfg.write_text(GRUB_CFG)
    grub = tmp / "BOOTX64.EFI"
    run(
        [
            "grub-mkstandalone",
            "--format=x86_64-efi",
            f"--directory={GRUB_MODULE_DIR}",
            f"--install-modules={GRUB_MODULES}",
            "--modules=part_gpt fat ext2",
            "--locales=",
            "--fonts=",
            "--themes=",
            f"--output={grub}",
            f"boot/grub/grub.cfg={cfg}",
        ],
        "grub-mkstandalone",
    )
    # 2. The EFI system partition as a FAT image, filled without mounting.
    esp = tmp / "esp.img"
    run(["mkfs.vfat", "-F", "32", "-n", "ESP", "-C", str(esp), str(ESP_MIB * 1024)], "mkfs.vfat")
    for directory in ("::/EFI", "::/EFI/BOOT", "::/sandbox"):
        run(["mmd", "-i", str(esp), directory], "mmd")
    run(["mcopy", "-i", str(esp), str(grub), "::/EFI/BOOT/BOOTX64.EFI"], "mcopy grub")
    run(["mcopy", "-i", str(esp), str(base.kernel), "::/sandbox/vmlinuz"], "mcopy kernel")
    run(["mcopy", "-i", str(esp), str(base.initramfs), "::/sandbox/initramfs.cpio.gz"], "mcopy initramfs")
    # 3. GPT disk: [1 MiB gap][ESP][root][backup GPT], partitions copied in sparsely.
    root = tmp / "root.ext4"
    root_mib = -(-root.stat().st_size // (1 << 20))
    disk = tmp / "disk.raw"
    with open(disk, "wb") as fh:
        fh.truncate((ALIGN_MIB + ESP_MIB + root_mib + ALIGN_MIB) << 20)
    sectors_per_mib = (1 << 20) // 512
    esp_start = ALIGN_MIB * sectors_per_mib
    root_start = (ALIGN_MIB + ESP_MIB) * sectors_per_mib
    run(
        [
            "sgdisk",
            f"--new=1:{esp_start}:{root_start - 1}",
            "--typecode=1:ef00",
            "--change-name=1:ESP",
            f"--new=2:{root_start}:{root_start + root_mib * sectors_per_mib - 1}",
            "--typecode=2:8304",  # Linux x86-64 root (systemd's discoverable partitions)
            "--change-name=2:root",
            str(disk),
        ],
        "sgdisk",
    )
    for part, start_mib in ((esp, ALIGN_MIB), (root, ALIGN_MIB + ESP_MIB)):
        run(
            ["dd", f"if={part}", f"of={disk}", "bs=1M", f"seek={start_mib}", "conv=notrunc,sparse", "status=none"],
            "dd",
        )
    for leftover in (cfg, grub, esp, root):
        leftover.unlink()


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m vms.vmm.image_uefi OUT_DIR`` builds (or reuses) the UEFI disk and prints its path."""
    parser = argparse.ArgumentParser(prog="python -m vms.vmm.image_uefi", description="Build the UEFI Linux image.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--base-dir", type=Path, default=None, help="cache of the base image (default OUT_DIR)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        art = build_uefi_image(
            args.out_dir,
            base_dir=args.base_dir,
            progress=lambda msg: print(f"[{time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr, flush=True),
        )
    except ImageBuildError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if isinstance(exc.details, dict) and exc.details.get("output"):
            print(exc.details["output"], file=sys.stderr)
        return 1
    print(json.dumps({"disk": str(art.disk), "digest": art.digest, "boot_mode": "uefi"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
