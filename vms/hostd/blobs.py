"""Files of a host, read and written through its hostd (no Django): the transfer primitive that
moves VM disks, snapshots and images between hosts.

Hosts never talk to each other (their certificates are server-only): the control plane reads
a file from one hostd in chunks (``blob_read``) and writes them to another (``blob_write``),
which keeps them in a temporary file beside the destination until ``blob_commit`` checks the
size and sha256 and renames it into place (atomic: a file under its final name is always
whole). ``blob_abort`` drops the temporary file.

Every path is relative to one of a few **roots** hostd is configured with (``runtime``: the
VMs' runtime directories, ``snapshots``, ``images``, ...). Paths are checked strictly: no
absolute paths, no ``..``, no dot-files (the temporary files are dot-files), nothing whose
real location (symlinks followed) leaves its root. An existing file is never replaced unless
the commit says ``overwrite``. Sizes are bounded (``MAX_BLOB_BYTES``, and the free space of
the destination's filesystem); hashing and disk I/O run on worker threads, never on the
event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vms.hostd.errors import HostdError

MAX_BLOB_BYTES = 1 << 40  # 1 TiB: no disk or image of ours comes near
MAX_PATH_CHARS = 1024
MAX_PATH_PARTS = 16
MAX_PENDING = 64  # temporary files one hostd holds at once (each an unfinished transfer)
PENDING_STALE_SECONDS = 3600.0  # a temporary file untouched this long is dropped
FREE_SPACE_MARGIN = 64 << 20  # a write must leave this much free on the filesystem
# Images are read by every VMM (an unprivileged user) as the built ones are: copies into these
# roots become world-readable, root's (0644); everything else arrives root-only (0600) and the
# receiving host's worker gives it to the VMM group where a VMM needs it (snapshot layers:
# ``snapshots.lifecycle.snapshot_chain_verify`` and the move's landing).
PUBLIC_ROOTS = frozenset({"images", "image_store"})
PUBLIC_MODE = 0o644
_HASH_CHUNK = 1 << 20
_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+@=-]{0,254}$")
_TRANSFER = re.compile(r"^[0-9a-f]{16,64}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_LEFTOVER = re.compile(r"^\..+\.[0-9a-f]{16,64}\.part$")


class BlobStore:
    """The files hostd may read and write: ``roots`` maps a root name to its directory."""

    def __init__(self, roots: Mapping[str, Path], *, max_bytes: int = MAX_BLOB_BYTES) -> None:
        self.roots = {name: Path(path) for name, path in roots.items()}
        self.max_bytes = max_bytes
        # temporary path -> when it was last written (monotonic); bounded by MAX_PENDING
        self.pending: dict[Path, float] = {}
        self.lock = asyncio.Lock()

    # ----- paths -------------------------------------------------------------------------

    def resolve(self, root: object, path: object) -> Path:
        """The absolute path of ``path`` under ``root``; ``HostdError`` ``bad_path`` when it is
        not a plain relative path staying inside that root."""
        if not isinstance(root, str) or root not in self.roots:
            raise HostdError("bad_path", f"unknown root {root!r} (known: {', '.join(sorted(self.roots))})")
        if not isinstance(path, str) or not path or len(path) > MAX_PATH_CHARS:
            raise HostdError("bad_path", "path must be a non-empty relative path")
        parts = path.split("/")
        if len(parts) > MAX_PATH_PARTS or not all(_PART.match(part) for part in parts):
            raise HostdError("bad_path", f"path {path!r} is not a plain relative path (no '..', no dot-files)")
        base = self.roots[root]
        full = base.joinpath(*parts)
        real_base = os.path.realpath(base)
        real = os.path.realpath(full)
        if os.path.commonpath([real_base, real]) != real_base or real == real_base:
            raise HostdError("bad_path", f"path {path!r} leaves its root")
        _dirs_fixed(base, parts[:-1], path)
        return full

    @staticmethod
    def temporary(full: Path, transfer: object) -> Path:
        if not isinstance(transfer, str) or not _TRANSFER.match(transfer):
            raise HostdError("bad_request", "transfer must be 16 to 64 lowercase hex digits")
        return full.with_name(f".{full.name}.{transfer}.part")

    # ----- ops (called from the daemon's session) -----------------------------------------

    async def stat(self, args: dict[str, Any]) -> dict[str, Any]:
        """``{root, path, sha256: bool = true}`` -> ``{exists, size, sha256}``."""
        full = self.resolve(args.get("root"), args.get("path"))
        want_hash = args.get("sha256", True) is not False
        return await asyncio.get_running_loop().run_in_executor(None, _stat, full, want_hash)

    async def read(self, args: dict[str, Any], max_chunk: int) -> tuple[dict[str, Any], bytes]:
        """``{root, path, offset, length}`` -> up to ``min(length, max_chunk)`` bytes
        (fewer at the end of the file; none past it: ``eof``)."""
        full = self.resolve(args.get("root"), args.get("path"))
        offset = _nonneg(args, "offset")
        length = min(_nonneg(args, "length"), max_chunk)
        data = await asyncio.get_running_loop().run_in_executor(None, _read, full, offset, length)
        return {"offset": offset, "eof": len(data) < length or length == 0}, data

    async def write(self, args: dict[str, Any], data: bytes) -> dict[str, Any]:
        """``{root, path, transfer, offset, size}`` + data: write the bytes at ``offset`` of the
        transfer's temporary file (``size``: the whole file's size, which bounds every write)."""
        full = self.resolve(args.get("root"), args.get("path"))
        temp = self.temporary(full, args.get("transfer"))
        offset = _nonneg(args, "offset")
        size = _nonneg(args, "size")
        if size > self.max_bytes:
            raise HostdError("too_large", f"a file may have at most {self.max_bytes} bytes")
        if offset + len(data) > size:
            raise HostdError("bad_request", f"a write ending at {offset + len(data)} exceeds the size {size}")
        async with self.lock:
            self._forget_stale()
            if temp not in self.pending:
                if len(self.pending) >= MAX_PENDING:
                    raise HostdError("too_many", f"{MAX_PENDING} transfers are unfinished on this host")
                self.pending[temp] = time.monotonic()  # before the file exists: the sweep leaves it
                try:
                    await asyncio.get_running_loop().run_in_executor(None, _begin, full, temp, size)
                except BaseException:
                    self.pending.pop(temp, None)
                    raise
            self.pending[temp] = time.monotonic()
        try:
            await asyncio.get_running_loop().run_in_executor(None, _pwrite, temp, offset, data)
        except FileNotFoundError as exc:  # aborted meanwhile
            raise HostdError("not_found", "the transfer was aborted") from exc
        return {"written": len(data)}

    async def commit(self, args: dict[str, Any]) -> dict[str, Any]:
        """``{root, path, transfer, size, sha256, overwrite: bool = false}``: the temporary file
        becomes ``path`` when its size and sha256 are the ones given; otherwise it is deleted
        and ``checksum_mismatch`` (or ``size_mismatch``) answered. Nothing is replaced unless
        ``overwrite``; then ``exists``."""
        full = self.resolve(args.get("root"), args.get("path"))
        temp = self.temporary(full, args.get("transfer"))
        size = _nonneg(args, "size")
        sha256 = args.get("sha256")
        if not isinstance(sha256, str) or not _SHA256.match(sha256):
            raise HostdError("bad_request", "sha256 must be 64 lowercase hex digits")
        overwrite = args.get("overwrite") is True
        async with self.lock:  # still pending while it is checked and renamed: the start-up sweep leaves it
            self.pending[temp] = time.monotonic()
        try:
            mode = PUBLIC_MODE if args.get("root") in PUBLIC_ROOTS else 0o600
            await asyncio.get_running_loop().run_in_executor(None, _commit, temp, full, size, sha256, overwrite, mode)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        finally:
            async with self.lock:
                self.pending.pop(temp, None)
        return {"size": size, "sha256": sha256}

    async def abort(self, args: dict[str, Any]) -> dict[str, Any]:
        """``{root, path, transfer}``: drop the transfer's temporary file (idempotent)."""
        full = self.resolve(args.get("root"), args.get("path"))
        temp = self.temporary(full, args.get("transfer"))
        async with self.lock:
            self.pending.pop(temp, None)
        try:
            temp.unlink()
        except FileNotFoundError:
            return {"aborted": False}
        return {"aborted": True}

    async def delete(self, args: dict[str, Any]) -> dict[str, Any]:
        """``{root, path}``: delete a file (not a directory; idempotent), then its parent
        directories up to the root while they are empty."""
        full = self.resolve(args.get("root"), args.get("path"))
        root = self.roots[str(args["root"])]
        return await asyncio.get_running_loop().run_in_executor(None, _delete, full, root)

    def sweep(self) -> int:
        """Delete temporary files left by transfers a previous hostd was receiving (their
        connections died with it); returns how many. Blocking: run it on a worker thread."""
        removed = 0
        for root in self.roots.values():
            for directory, dirs, names in os.walk(root):
                if directory.count(os.sep) - str(root).count(os.sep) >= MAX_PATH_PARTS - 1:
                    dirs.clear()  # no transfer goes deeper
                for name in names:
                    path = Path(directory, name)
                    # (a transfer of this run, begun while the sweep walks, is left alone)
                    if _LEFTOVER.match(name) and path not in self.pending:
                        with contextlib.suppress(OSError):
                            path.unlink()
                            removed += 1
        return removed

    def _forget_stale(self) -> None:
        now = time.monotonic()
        for temp, touched in list(self.pending.items()):
            if now - touched > PENDING_STALE_SECONDS:
                del self.pending[temp]
                with contextlib.suppress(OSError):
                    temp.unlink()


def _dirs_fixed(base: Path, dirs: list[str], path: str) -> None:
    """hostd (root) then acts on ``path``'s last part only in ways that never follow a symlink
    there (``O_NOFOLLOW``, ``O_EXCL``, link, rename, unlink): that is safe while no one but root
    can swap a directory on the way. A VMM (unprivileged, untrusted) may write in its VM's
    runtime directory (mode 1770): it can plant a name there, but it must not be able to swap
    a directory of the path for a symlink after the check above. So every directory containing
    a directory of the path (the root, and each but the last) must be root's and writable by
    root only, and none is a symlink (``bad_path``). Missing directories are created by hostd
    (root's, 0755)."""
    current = base
    chain = [base, *(base.joinpath(*dirs[: i + 1]) for i in range(len(dirs)))]
    for index, current in enumerate(chain):
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return  # from here on hostd creates them
        if not stat.S_ISDIR(st.st_mode):
            raise HostdError("bad_path", f"path {path!r}: {current.name} is not a directory")
        holds_next = index < len(chain) - 1
        if holds_next and (st.st_uid != 0 or st.st_mode & 0o022):
            raise HostdError("bad_path", f"path {path!r}: {current} may be changed by others than root")


def _open_regular(full: Path) -> int:
    """A read-only descriptor of the regular file ``full`` (a symlink, FIFO or device there:
    ``bad_path``; never blocks on a FIFO)."""
    try:
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise HostdError("bad_path", f"cannot read it: {exc.strerror}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise HostdError("bad_path", "not a regular file")
    return fd


def _nonneg(args: dict[str, Any], name: str) -> int:
    value = args.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise HostdError("bad_request", f"{name} must be a non-negative integer")
    return value


def file_sha256(path: Path) -> tuple[int, str]:
    """``(size, sha256)`` of the regular file at ``path`` (symlinks not followed)."""
    hasher = hashlib.sha256()
    size = 0
    fd = _open_regular(path)
    try:
        while True:
            chunk = os.read(fd, _HASH_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            hasher.update(chunk)
    finally:
        os.close(fd)
    return size, hasher.hexdigest()


def _stat(full: Path, want_hash: bool) -> dict[str, Any]:
    try:
        st = full.lstat()
    except FileNotFoundError:
        return {"exists": False}
    if not full.is_file() or full.is_symlink():
        raise HostdError("bad_path", "not a regular file")
    if not want_hash:
        return {"exists": True, "size": st.st_size}
    size, digest = file_sha256(full)
    return {"exists": True, "size": size, "sha256": digest}


def _read(full: Path, offset: int, length: int) -> bytes:
    try:
        fd = _open_regular(full)
    except FileNotFoundError as exc:
        raise HostdError("not_found", "no such file") from exc
    try:
        return os.pread(fd, length, offset)
    except IsADirectoryError as exc:
        raise HostdError("bad_path", "not a regular file") from exc
    finally:
        os.close(fd)


def _begin(full: Path, temp: Path, size: int) -> None:
    """Create the directories and the empty temporary file of a new transfer, when the
    filesystem has room for ``size`` more bytes."""
    full.parent.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(full.parent)
    if st.f_bavail * st.f_frsize < size + FREE_SPACE_MARGIN:
        raise HostdError("no_space", f"the filesystem of {full.parent} has no room for {size} bytes")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    os.close(fd)


def _pwrite(temp: Path, offset: int, data: bytes) -> None:
    fd = os.open(temp, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
    finally:
        os.close(fd)


def _commit(temp: Path, full: Path, size: int, sha256: str, overwrite: bool, mode: int = 0o600) -> None:
    try:
        actual_size, digest = file_sha256(temp)
    except FileNotFoundError as exc:
        raise HostdError("not_found", "nothing was written for this transfer") from exc
    if actual_size != size:
        raise HostdError("size_mismatch", f"received {actual_size} bytes, expected {size}")
    if digest != sha256:
        raise HostdError("checksum_mismatch", f"received data has sha256 {digest}, expected {sha256}")
    fd = os.open(temp, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    if overwrite:
        if full.is_dir() and not full.is_symlink():
            raise HostdError("exists", "a directory has that name")
        os.replace(temp, full)
    else:
        try:  # link + unlink: never replaces a file that appeared meanwhile
            os.link(temp, full, follow_symlinks=False)
        except FileExistsError as exc:
            raise HostdError("exists", f"{full.name} exists (commit with overwrite to replace it)") from exc
        temp.unlink()
    dir_fd = os.open(full.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _delete(full: Path, root: Path) -> dict[str, Any]:
    try:
        if full.is_dir() and not full.is_symlink():
            raise HostdError("bad_path", "a directory: delete its files")
        full.unlink()
    except FileNotFoundError:
        return {"deleted": False}
    parent = full.parent
    while parent != root and root in parent.parents:
        try:
            parent.rmdir()
        except OSError:  # not empty (or gone): stop
            break
        parent = parent.parent
    return {"deleted": True}
