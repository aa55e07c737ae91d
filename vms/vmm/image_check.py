"""Check a disk image an operator uploads or registers before any VM uses it (no Django).

``inspect_disk_image`` runs ``qemu-img info --output=json`` (bounded in time and output) and
refuses what a VMM must never open on a tenant's behalf:

- a format other than the declared one, or outside ``raw``/``qcow2`` (vmdk, vhdx, luks...
  each with its own parser and features; convert them with ``qemu-img convert`` first);
- any backing file (a qcow2 that names ``/etc/shadow`` or another tenant's disk as its
  backing file would expose it to the guest) and qcow2 external data files;
- encryption, a virtual size above ``max_virtual_bytes``, a file above ``max_file_bytes``;
- a raw file that is not a disk: it must start with a partition table (MBR or GPT) or an
  ext2/3/4 superblock (a kernel-boot root filesystem); anything else is "not a disk image".

Errors are ``ImageRejected`` with a message fit for the API and ``details["reason"]``.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .base import VmmError

FORMATS = ("raw", "qcow2")
QEMU_IMG_TIMEOUT = 30.0
QEMU_IMG_MAX_OUTPUT = 1 << 20


class ImageRejected(VmmError):
    """The file is not a disk image this platform accepts; ``details["reason"]`` says why."""


@dataclass(frozen=True)
class DiskImageInfo:
    format: str
    virtual_bytes: int
    file_bytes: int
    layout: str  # "gpt", "mbr", "ext4" (raw root filesystem) or "qcow2"


def _reject(reason: str, message: str, **details: object) -> ImageRejected:
    return ImageRejected(message, details={"reason": reason, **details})


def raw_layout(path: Path) -> str:
    """``gpt``/``mbr``/``ext4`` from the first sectors of a raw disk, or ``""`` if none."""
    with open(path, "rb") as fh:
        head = fh.read(2048)
    if len(head) >= 520 and head[512:520] == b"EFI PART":
        return "gpt"
    if len(head) >= 1082 and head[1080:1082] == b"\x53\xef":
        return "ext4"
    if len(head) >= 512 and head[510:512] == b"\x55\xaa":
        return "mbr"
    return ""


def inspect_disk_image(
    path: Path,
    *,
    declared_format: str,
    max_virtual_bytes: int,
    max_file_bytes: int,
    qemu_img: str = "qemu-img",
) -> DiskImageInfo:
    """Validate ``path`` as a ``declared_format`` disk image; raises ``ImageRejected``."""
    if declared_format not in FORMATS:
        raise _reject("format", f"Unsupported image format {declared_format!r}: use raw or qcow2.")
    size = path.stat().st_size
    if size > max_file_bytes:
        raise _reject("too_large", f"The image file is larger than {max_file_bytes} bytes.", limit=max_file_bytes)
    if size == 0:
        raise _reject("not_an_image", "The file is empty.")
    try:
        proc = subprocess.run(  # noqa: S603 - argv of our own
            # No -f: let qemu-img probe, so a qcow2 declared as raw is caught. info never
            # opens backing files, so a hostile backing name is only read, not followed.
            [qemu_img, "info", "--output=json", str(path)],
            capture_output=True,
            timeout=QEMU_IMG_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise _reject("inspect_failed", "Inspecting the image timed out.") from exc
    except OSError as exc:
        raise VmmError(f"cannot run {qemu_img}: {exc}") from exc
    if proc.returncode != 0 or len(proc.stdout) > QEMU_IMG_MAX_OUTPUT:
        raise _reject(
            "not_an_image",
            "qemu-img cannot read this file as a disk image.",
            stderr=proc.stderr.decode("utf-8", "replace")[-500:],
        )
    try:
        info = json.loads(proc.stdout)
    except ValueError as exc:
        raise _reject("inspect_failed", "qemu-img gave unreadable output.") from exc
    fmt = str(info.get("format", ""))
    if fmt not in FORMATS:
        raise _reject("format", f"Images in {fmt or 'this'} format are not accepted: convert to qcow2 or raw.")
    if fmt != declared_format:
        raise _reject("format_mismatch", f"The file is {fmt}, not {declared_format} as declared.", detected=fmt)
    if info.get("backing-filename") or info.get("full-backing-filename") or info.get("backing-filename-format"):
        raise _reject(
            "backing_file",
            "Images with a backing file are not accepted: flatten it with 'qemu-img convert' first.",
            backing_file=str(info.get("backing-filename", "")),
        )
    specific = info.get("format-specific") or {}
    data = specific.get("data") if isinstance(specific, dict) else None
    if isinstance(data, dict) and data.get("data-file"):
        raise _reject("data_file", "qcow2 images with an external data file are not accepted.")
    if info.get("encrypted") or (isinstance(data, dict) and data.get("encrypt")):
        raise _reject("encrypted", "Encrypted images are not accepted.")
    virtual = int(info.get("virtual-size") or 0)
    if virtual > max_virtual_bytes:
        raise _reject(
            "too_large",
            f"The image's disk size ({virtual} bytes) exceeds the limit of {max_virtual_bytes} bytes.",
            limit=max_virtual_bytes,
        )
    layout = "qcow2"
    if fmt == "raw":
        layout = raw_layout(path)
        if not layout:
            raise _reject(
                "not_an_image", "This raw file has no partition table and no ext4 filesystem: not a disk image."
            )
    return DiskImageInfo(format=fmt, virtual_bytes=virtual, file_bytes=size, layout=layout)
