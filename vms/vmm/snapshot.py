"""Snapshot files shared by the VMM drivers: metadata, integrity manifest, qcow2 chains (no Django).

A snapshot is one directory:

- ``snapshot.json``  ``SnapshotMeta``: driver, VMM version, sizes, which file holds what;
- ``manifest.json``  sha256 and size of every other file of the directory;
- the driver's files: for QEMU ``state.bin`` (device + RAM state, absent without memory)
  and ``disk.qcow2`` (the frozen disk layer, whose backing file is the previous layer or
  the base image); for cloud-hypervisor its ``config.json``/``state.json``/``memory-ranges``
  and a copy of the overlay.

Files of a snapshot never change after it is taken: later layers are created *on top* of
``disk.qcow2`` (copy-on-write), so a checksum taken once stays valid, and the sha256 of
``manifest.json`` (kept by the caller, e.g. in a database) protects the manifest itself.
The one exception is deleting a layer that others build on: ``layer_rebase`` merges it
into its one dependent (whose manifest the caller then rewrites).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .base import VmmError, VmmTimeout

META_FILE = "snapshot.json"
MANIFEST_FILE = "manifest.json"
STATE_FILE = "state.bin"
DISK_LAYER = "disk.qcow2"
MANIFEST_VERSION = 1
_HASH_CHUNK = 1 << 20
_QCOW2_MAGIC = b"QFI\xfb"
_MAX_CHAIN = 256  # a backing chain longer than this is treated as a loop
QEMU_IMG = "qemu-img"
REBASE_TIMEOUT = 3600.0  # copies up to a whole layer's worth of clusters


class SnapshotIntegrityError(VmmError):
    """A file of a snapshot is missing, has the wrong size or the wrong sha256.
    ``path`` names the first bad file."""

    def __init__(self, message: str, *, path: Path, reason: str) -> None:
        super().__init__(message, details={"file": str(path), "reason": reason})
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class SnapshotMeta:
    """What a snapshot directory holds (``snapshot.json``)."""

    driver: str
    vmm_version: str
    vm_id: str
    include_memory: bool
    vcpus: int
    memory_mib: int
    disk_gib: int
    acceleration: str = ""
    disk_layer: str | None = DISK_LAYER  # relative name; None when the driver copies the disk elsewhere
    state_file: str | None = None  # relative name of the memory/device state, if any
    backing_chain: list[str] = field(default_factory=list)  # absolute paths below disk_layer, nearest first
    pause_ms: int = 0
    total_ms: int = 0
    created_unix: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=1)

    @classmethod
    def read(cls, directory: Path) -> SnapshotMeta:
        """Load ``directory/snapshot.json``; ``VmmError`` when absent or malformed."""
        try:
            data = json.loads((directory / META_FILE).read_text())
            return cls(**data)
        except FileNotFoundError as exc:
            raise SnapshotIntegrityError(
                f"snapshot file missing: {directory / META_FILE}", path=directory / META_FILE, reason="missing"
            ) from exc
        except (OSError, ValueError, TypeError) as exc:
            raise VmmError(f"unreadable snapshot metadata in {directory}: {exc}") from exc

    def write(self, directory: Path) -> None:
        write_atomic(directory / META_FILE, self.to_json())


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file, fsync and rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def disk_usage(path: Path) -> int:
    """Bytes a file or directory really occupies (allocated blocks, so sparse files count
    for what they hold)."""
    if path.is_file():
        return path.stat().st_blocks * 512
    total = 0
    for entry in path.rglob("*"):
        if entry.is_file() and not entry.is_symlink():
            total += entry.stat().st_blocks * 512
    return total


def manifest_write(directory: Path) -> str:
    """Hash every regular file of ``directory`` (except the manifest) into ``manifest.json``;
    returns the sha256 of the manifest, which the caller stores to protect it."""
    files: dict[str, dict[str, Any]] = {}
    for entry in sorted(directory.iterdir()):
        if entry.name == MANIFEST_FILE or entry.name.startswith(".") or not entry.is_file() or entry.is_symlink():
            continue
        files[entry.name] = {"sha256": sha256_file(entry), "size": entry.stat().st_size}
    write_atomic(
        directory / MANIFEST_FILE,
        json.dumps({"version": MANIFEST_VERSION, "files": files}, sort_keys=True, indent=1),
    )
    return sha256_file(directory / MANIFEST_FILE)


def manifest_verify(directory: Path, *, expected_checksum: str | None = None) -> dict[str, int]:
    """Check every file listed in ``manifest.json`` (presence, size, sha256), and the
    manifest's own sha256 when ``expected_checksum`` is given. Returns ``{name: size}``.

    Raises ``SnapshotIntegrityError`` naming the first bad file."""
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise SnapshotIntegrityError(f"snapshot file missing: {manifest_path}", path=manifest_path, reason="missing")
    if expected_checksum is not None and sha256_file(manifest_path) != expected_checksum:
        raise SnapshotIntegrityError(
            f"snapshot manifest was altered: {manifest_path}", path=manifest_path, reason="checksum mismatch"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SnapshotIntegrityError(
            f"snapshot manifest unreadable: {manifest_path}", path=manifest_path, reason="unreadable"
        ) from exc
    sizes: dict[str, int] = {}
    for name, entry in sorted(files.items()):
        path = directory / name
        if "/" in name or name.startswith("."):
            raise SnapshotIntegrityError(f"snapshot manifest names a bad path: {name}", path=path, reason="bad name")
        try:
            size = path.stat().st_size
        except FileNotFoundError as exc:
            raise SnapshotIntegrityError(f"snapshot file missing: {path}", path=path, reason="missing") from exc
        if size != entry.get("size"):
            raise SnapshotIntegrityError(
                f"snapshot file has the wrong size: {path} ({size} bytes, expected {entry.get('size')})",
                path=path,
                reason="size mismatch",
            )
        if sha256_file(path) != entry.get("sha256"):
            raise SnapshotIntegrityError(
                f"snapshot file is corrupted: {path} (sha256 mismatch)", path=path, reason="checksum mismatch"
            )
        sizes[name] = size
    return sizes


def qcow2_backing_file(path: Path) -> str | None:
    """The backing file name recorded in a qcow2 header (``None`` when there is none).
    Reads only the header, so it works while QEMU has the image open."""
    with open(path, "rb") as fh:
        header = fh.read(20)
        if len(header) < 20 or header[:4] != _QCOW2_MAGIC:
            raise VmmError(f"not a qcow2 image: {path}")
        offset, size = struct.unpack(">QI", header[8:20])
        if offset == 0 or size == 0:
            return None
        if size > 1023:
            raise VmmError(f"qcow2 backing file name too long in {path}")
        fh.seek(offset)
        return fh.read(size).decode("utf-8", "replace")


def backing_chain(path: Path) -> list[str]:
    """Absolute paths of the backing files below ``path``, nearest first (stops at the first
    non-qcow2 file, e.g. the raw base image)."""
    chain: list[str] = []
    current = path
    for _ in range(_MAX_CHAIN):
        try:
            backing = qcow2_backing_file(current)
        except (VmmError, OSError):
            return chain
        if backing is None:
            return chain
        resolved = (current.parent / backing).resolve() if not os.path.isabs(backing) else Path(backing)
        chain.append(str(resolved))
        current = resolved
    raise VmmError(f"backing chain of {path} is too long (loop?)")


def layer_rebase(
    image: Path, new_backing: Path | None, *, qemu_img: str = QEMU_IMG, timeout: float = REBASE_TIMEOUT
) -> None:
    """Put the qcow2 ``image`` on ``new_backing`` (``None``: no backing file) without changing
    its content: a safe ``qemu-img rebase`` first copies into ``image`` every cluster that
    differs between the old and the new backing chain. Used to merge a snapshot layer into
    its one dependent before the layer is deleted. ``image`` must not be open in a running
    VMM. Raises ``VmmError`` (``details["stderr"]``) or ``VmmTimeout`` after ``timeout``."""
    argv = [qemu_img, "rebase", "-q", "-f", "qcow2"]
    if new_backing is None:
        argv += ["-b", "", str(image)]
    else:
        fmt = "qcow2" if new_backing.name.endswith(".qcow2") else "raw"
        argv += ["-b", str(new_backing), "-F", fmt, str(image)]
    try:
        subprocess.run(argv, check=True, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)  # noqa: S603
    except subprocess.CalledProcessError as exc:
        raise VmmError(
            "merging the snapshot layer failed",
            details={"image": str(image), "stderr": exc.stderr.decode("utf-8", "replace")},
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise VmmTimeout(f"merging the snapshot layer did not finish within {timeout:.0f}s") from exc
    except OSError as exc:
        raise VmmError(f"cannot run {qemu_img}: {exc}") from exc
