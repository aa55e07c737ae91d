"""Copying files between hypervisor hosts (VM disks and snapshots when a VM moves, images).

Hosts never call each other: a host's certificate is server-only (docs/scale-out.md), so the
control plane relays. ``host_file_copy`` reads the file from the source host's hostd and
writes it to the target host's (``blob_read`` / ``blob_write``, vms.hostd.blobs), at most
``TRANSFER_WINDOW`` chunks in flight each way; the target keeps the bytes in a temporary
file and renames it into place only when their sha256 is the one the source reported (or
the caller expected). Anything else leaves nothing on the target.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from sandbox_site.errors import ApplicationError
from vms.hostd.client import HostdClient
from vms.hostd.errors import HostdError
from vms.hostd_address import hostd_address
from vms.models import Host

logger = logging.getLogger("vms.transfer")

COPY_TIMEOUT = 60.0  # per request (a chunk, a read); hashing a file: ``hash_seconds``
HASH_BYTES_PER_SECOND = 50 << 20  # the slowest disk we wait for when a hostd hashes a file


def host_roots() -> dict[str, Path]:
    """This host's directories by the root names its hostd serves them under for copies between
    hosts (``manage.py hostd``): the one map of them."""
    return {
        "runtime": Path(settings.SANDBOX_RUNTIME_DIR),
        "snapshots": Path(settings.SANDBOX_SNAPSHOT_DIR),
        "images": Path(settings.SANDBOX_IMAGE_DIR),
        "image_store": Path(settings.SANDBOX_IMAGE_STORE),
    }


def root_of(path: Path, roots: dict[str, Path]) -> tuple[str, str] | None:
    """``(root name, path below it)`` of ``path`` under one of ``roots`` (the first holding it),
    symlinks resolved; None when it is under none of them."""
    real = os.path.realpath(path)
    for name, root in roots.items():
        base = os.path.realpath(root)
        if os.path.commonpath([base, real]) == base and real != base:
            return name, os.path.relpath(real, base)
    return None


def hash_seconds(size: int) -> float:
    """How long a hostd may take to hash a file of ``size`` bytes (at least 10 minutes)."""
    return max(600.0, size / HASH_BYTES_PER_SECOND)


class TransferError(ApplicationError):
    """A copy between hosts failed; nothing was left under the target path."""

    code = "transfer_failed"
    status_code = 502


@dataclass(frozen=True)
class CopyResult:
    sha256: str
    size: int
    copied: bool  # False: the target held the same bytes already


def host_file_copy(
    *, source: Host, target: Host, root: str, path: str, sha256: str | None = None, timeout: float = COPY_TIMEOUT
) -> str:
    """Copy ``root``/``path`` from ``source``'s hostd to ``target``'s; return its sha256
    (``host_file_copy_report`` says whether bytes were copied)."""
    return host_file_copy_report(
        source=source, target=target, root=root, path=path, sha256=sha256, timeout=timeout
    ).sha256


def host_file_copy_report(
    *,
    source: Host,
    target: Host,
    root: str,
    path: str,
    sha256: str | None = None,
    timeout: float = COPY_TIMEOUT,
    overwrite: bool = False,
) -> CopyResult:
    """Copy ``root``/``path`` from ``source``'s hostd to ``target``'s; return its sha256.

    ``sha256``: what the file must hash to (else the source's own hash is the reference).
    A file already on the target with that hash is left as it is (not copied again); one
    with other bytes is an error (``exists``), unless ``overwrite`` (a VM's own file a killed
    move left there): then it is replaced once the new bytes are verified. Raises ``TransferError``
    (``checksum_mismatch``, ``not_found``, ``hostd_unavailable`` ...) with nothing left behind.
    """
    if source.pk == target.pk:
        raise TransferError("Source and target are the same host.", code="same_host")
    try:
        with (
            HostdClient(hostd_address(source), timeout=timeout) as src,
            HostdClient(hostd_address(target), timeout=timeout) as dst,
        ):
            found = src.blob_stat(root, path, sha256=False)
            if not found.get("exists"):
                raise TransferError(
                    f"{root}/{path} does not exist on host {source.name}.",
                    code="not_found",
                    details={"host": source.name, "root": root, "path": path},
                )
            hashing = hash_seconds(int(found["size"]))
            info = src.blob_stat(root, path, timeout=hashing)
            size, digest = int(info["size"]), str(info["sha256"])
            if sha256 is not None and digest != sha256:
                raise TransferError(
                    f"{root}/{path} on host {source.name} has sha256 {digest}, expected {sha256}.",
                    code="checksum_mismatch",
                    details={"host": source.name, "path": path, "sha256": digest, "expected": sha256},
                )
            present = dst.blob_stat(root, path, sha256=False)
            if present.get("exists"):
                if present.get("size") == size:
                    present = dst.blob_stat(root, path, timeout=hashing)
                if present.get("sha256") == digest:
                    logger.info("%s/%s already on host %s (sha256 %s)", root, path, target.name, digest)
                    return CopyResult(sha256=digest, size=size, copied=False)
                if overwrite:
                    logger.info("%s/%s on host %s has other contents: replacing it", root, path, target.name)
                else:
                    raise TransferError(
                        f"{root}/{path} exists on host {target.name} with other contents.",
                        code="exists",
                        details={"host": target.name, "path": path, "size": present.get("size"), "expected": digest},
                    )
            chunks = src.blob_chunks(root, path, size, timeout=timeout)
            dst.blob_put(root, path, chunks, size=size, sha256=digest, overwrite=overwrite, commit_timeout=hashing)
    except HostdError as exc:
        raise TransferError(
            f"Copying {root}/{path} from host {source.name} to {target.name} failed: {exc.message}",
            code=exc.code if exc.code in ("checksum_mismatch", "size_mismatch", "no_space") else "transfer_failed",
            details={"source": source.name, "target": target.name, "root": root, "path": path, "reason": exc.code},
        ) from exc
    logger.info(
        "copied %s/%s (%d bytes, sha256 %s) from host %s to %s", root, path, size, digest, source.name, target.name
    )
    return CopyResult(sha256=digest, size=size, copied=True)


def host_file_delete(*, host: Host, root: str, path: str, timeout: float = 30.0) -> bool:
    """Delete ``root``/``path`` on ``host`` through its hostd (False: it was not there)."""
    try:
        with HostdClient(hostd_address(host), timeout=timeout) as client:
            return client.blob_delete(root, path, timeout=timeout)
    except HostdError as exc:
        raise TransferError(
            f"Deleting {root}/{path} on host {host.name} failed: {exc.message}",
            code="transfer_failed",
            details={"host": host.name, "root": root, "path": path, "reason": exc.code},
        ) from exc
