"""Build the UEFI Linux guest image: a GPT disk that firmware (OVMF, CLOUDHV.fd) boots (no Django).

It reuses the direct-boot image of ``vms.vmm.image`` (same debootstrap root filesystem,
kernel and initramfs, built or taken from its cache) and lays it out as a bootable disk,
without loop mounts or touching the host's boot loader:

- partition 1, ``ESP`` (FAT32, 64 MiB): ``EFI/BOOT/BOOTX64.EFI``, a standalone GRUB made by
  ``grub-mkstandalone`` from Debian's ``grub-efi-amd64-bin`` with its ``grub.cfg`` built in
  (the removable-media path, so no NVRAM boot entry is needed), plus ``sandbox/vmlinuz``
  and ``sandbox/initramfs.cpio.gz``; filled with mtools;
- partition 2, ``root`` (ext4): a copy of ``rootfs.ext4`` whose ``rc.sysinit`` also reads the
  ``sandbox.*`` settings (hostname, VM id, network) from SMBIOS OEM strings, because with
  firmware boot GRUB's fixed command line reaches the kernel, not the host's; edited with
  ``debugfs -w`` (no mount).

The guest runs the same busybox init and agent as the direct-boot image. Cached under
``out_dir/uefi-<sha256 of inputs>/disk.raw`` (inputs: the base image digest, GRUB's modules,
the grub.cfg and the files replaced in the root), built in a temporary directory and renamed
into place, serialised by the same lock file as ``build_image``.

CLI: ``python -m vms.vmm.image_uefi OUT_DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .image import RC_SYSINIT, ImageArtifacts, ImageBuildError, _build_lock, _run, build_image, cached_image

UEFI_BUILDER_VERSION = "1"
ESP_MIB = 64
ALIGN_MIB = 1  # first partition starts at 1 MiB; GPT backup needs the last 33 sectors
GRUB_MODULE_DIR = Path("/usr/lib/grub/x86_64-efi")
GRUB_MODULES = "part_gpt fat ext2 normal linux search search_fs_file serial terminal echo test"
STEP_TIMEOUT = 600
ROOT_DEVICE = "/dev/vda2"

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
RC_SYSINIT_UEFI = RC_SYSINIT.replace("sandbox_args() { $bb cat /proc/cmdline; }\n", _OEM_ARGS, 1)
ROOT_FILES: dict[str, tuple[str, int]] = {
    "/usr/local/lib/sandbox/rc.sysinit": (RC_SYSINIT_UEFI, 0o755),
    "/etc/fstab": (f"{ROOT_DEVICE} / ext4 rw,relatime 0 1\n", 0o644),
}


@dataclass(frozen=True)
class UefiImageArtifacts:
    """A built UEFI disk (``disk``: raw GPT image) and the digest naming its cache directory."""

    disk: Path
    digest: str
    base: ImageArtifacts


def uefi_inputs(base: ImageArtifacts) -> dict[str, object]:
    """Everything the UEFI disk depends on; its canonical JSON hash is the cache key."""
    grub = hashlib.sha256()
    for mod in sorted(GRUB_MODULE_DIR.glob("*.mod")):
        grub.update(mod.name.encode() + hashlib.sha256(mod.read_bytes()).digest())
    return {
        "builder_version": UEFI_BUILDER_VERSION,
        "base_digest": base.digest,
        "esp_mib": ESP_MIB,
        "grub_modules": GRUB_MODULES,
        "grub_sha256": grub.hexdigest(),
        "grub_cfg_sha256": hashlib.sha256(GRUB_CFG.encode()).hexdigest(),
        "root_files_sha256": hashlib.sha256(json.dumps(ROOT_FILES, sort_keys=True).encode()).hexdigest(),
    }


def _digest(inputs: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def cached_uefi_image(out_dir: Path, *, base_dir: Path | None = None) -> UefiImageArtifacts | None:
    """The UEFI disk for the current inputs if it is already built, without building."""
    base = cached_image(base_dir or out_dir)
    if base is None:
        return None
    digest = _digest(uefi_inputs(base))
    directory = out_dir / f"uefi-{digest}"
    if not (directory / "manifest.json").is_file():
        return None
    return UefiImageArtifacts(disk=directory / "disk.raw", digest=digest, base=base)


def build_uefi_image(
    out_dir: Path, *, base_dir: Path | None = None, progress: Callable[[str], None] = lambda _msg: None
) -> UefiImageArtifacts:
    """Build (or reuse from cache) the UEFI Linux disk under ``out_dir``, from the base image
    in ``base_dir`` (default ``out_dir``; built first if needed). Needs root for the base
    image only; the disk steps run as any user. Raises ``ImageBuildError``."""
    out_dir = out_dir.resolve()
    base = build_image((base_dir or out_dir).resolve(), progress=progress)
    if not GRUB_MODULE_DIR.is_dir():
        raise ImageBuildError("GRUB for EFI not installed (apt-get install grub-efi-amd64-bin)")
    inputs = uefi_inputs(base)
    digest = _digest(inputs)
    final = out_dir / f"uefi-{digest}"
    with _build_lock(out_dir):
        if (final / "manifest.json").is_file():
            progress(f"UEFI image {digest[:12]} already built")
            return UefiImageArtifacts(disk=final / "disk.raw", digest=digest, base=base)
        started = time.monotonic()
        tmp = out_dir / f".tmp-uefi-{digest[:12]}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            _build_disk(tmp, base, progress=progress)
            disk = tmp / "disk.raw"
            manifest = {
                "digest": digest,
                "inputs": inputs,
                "boot_mode": "uefi",
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": round(time.monotonic() - started, 1),
                "disk": {"bytes": disk.stat().st_size, "allocated": disk.stat().st_blocks * 512},
                "sha256": _sha256_file(disk),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        progress(f"UEFI image {digest[:12]} built in {time.monotonic() - started:.0f}s at {final}")
        return UefiImageArtifacts(disk=final / "disk.raw", digest=digest, base=base)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    # 3. The root filesystem: a copy of the base one with the firmware-boot files replaced.
    root = tmp / "root.ext4"
    run(["cp", "--sparse=always", str(base.rootfs), str(root)], "copy rootfs")
    for path, (text, mode) in ROOT_FILES.items():
        src = tmp / ("file-" + Path(path).name)
        src.write_text(text)
        os.chmod(src, mode)
        _debugfs(root, [f"rm {path}", f"write {src} {path}", f"sif {path} mode 0{0o100000 | mode:o}"], progress)
    run(["e2fsck", "-fy", str(root)], "e2fsck")
    # 4. GPT disk: [1 MiB gap][ESP][root][backup GPT], partitions copied in sparsely.
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
    for leftover in (cfg, grub, esp, root, *tmp.glob("file-*")):
        leftover.unlink()


def _debugfs(fs: Path, commands: list[str], progress: Callable[[str], None]) -> None:
    progress(f"debugfs: {'; '.join(commands)}")
    proc = subprocess.run(  # noqa: S603
        ["debugfs", "-w", "-f", "-", str(fs)],
        input="\n".join(commands) + "\n",
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0 or "Could not" in proc.stderr or "not found" in proc.stderr.replace("File not found", ""):
        raise ImageBuildError("debugfs failed", details={"output": (proc.stdout + proc.stderr)[-4000:]})


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
