"""Images copied to a host on demand, verified by SHA-256.

Placement does not refuse a host that lacks a VM's image (``vms.placement``): before a VMM
starts or restores there, the worker of that host calls ``image_ensure_here``. It checks this
machine's copy against the image's canonical hashes (``vms.inventory``); when files are
missing or do not match, it deletes the bad ones and copies the image's files from a host
holding a verified copy (``vms.transfer.host_file_copy``: relayed by this worker between the
two hostds, committed on the target only when the bytes hash to the canonical SHA-256). The
operation log says what happened; the copy is recorded in the inventory and audited
(``image.copy``).

A source whose file does not hash to the canonical value is marked ``corrupt`` (its hash
cache dropped, so its own next inventory pass hashes it again) and the next source is tried;
when none is left the operation fails with ``image_unavailable`` and says why for each. Two
operations needing the same image on one host copy it once (a lock file per image, waited
for at most ``SANDBOX_IMAGE_COPY_TIMEOUT``).

An image without recorded hashes (built before they were kept) is assumed to be on every
host, as it was before inventories: it is neither checked nor copied.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from accounts.audit import audit_record
from sandbox_site.errors import ApplicationError
from vms.inventory import (
    host_image_record,
    image_copy_refresh,
    image_expected_sha256,
    image_file_location,
    image_files,
    image_holders,
)
from vms.models import VM, Host, HostImage, Image, Operation
from vms.operations import operation_log
from vms.selectors import host_is_up

logger = logging.getLogger(__name__)

LOCK_POLL_SECONDS = 0.5


class ImageUnavailable(ApplicationError):
    """The VM's image is not on its host and could not be copied there."""

    code = "image_unavailable"
    status_code = 409


def image_ensure_here(*, op: Operation, vm: VM) -> None:
    """On the VM's host, before its VMM starts or restores: make sure the VM's image files are
    here and match their canonical hashes, copying them from another host when not. Raises
    ``ImageUnavailable`` when they are not and cannot be."""
    host = vm.host or Host.objects.get(name=settings.SANDBOX_HOST_NAME)
    image_ensure(host=host, image=vm.boot_image, op=op)


def image_ensure(*, host: Host, image: Image, op: Operation | None = None) -> None:
    """``image_ensure_here`` for ``host`` (this machine's host) and ``image``; ``op``: the
    operation whose log says what happened (None: the worker's log only)."""
    if not image_expected_sha256(image):
        return
    # Unverified: every file here, matching the hashes that are known (the others never were).
    usable = (HostImage.Status.PRESENT, HostImage.Status.UNVERIFIED)
    row = image_copy_refresh(host=host, image=image)
    if row is not None and row.status in usable:
        return
    with _image_lock(image):
        row = image_copy_refresh(host=host, image=image)  # another operation may have copied it
        if row is not None and row.status in usable:
            _log(op, f"image {image.name} arrived on this host meanwhile")
            return
        why = "is not on this host" if row is None else f"is corrupt on this host ({row.error})"
        _log(op, f"image {image.name} {why}: copying it from another host", 5)
        image_copy_to(host=host, image=image, op=op, present=row)


def image_copy_to(*, host: Host, image: Image, op: Operation | None = None, present: HostImage | None = None) -> str:
    """Copy ``image``'s files to ``host`` (this machine's host) from the first up host holding
    a verified copy; returns that host's name. ``present``: this machine's row for the image
    (its files that do not match are deleted first: a copy never overwrites)."""
    expected = image_expected_sha256(image)
    files = image_files(image)
    try:
        locations = {role: image_file_location(path) for role, path in files.items()}
    except ValueError as exc:
        raise ImageUnavailable(f"Image {image.name} cannot be copied between hosts: {exc}.") from exc
    if set(files) - set(expected):
        raise ImageUnavailable(
            f"Image {image.name} has no recorded SHA-256 for {', '.join(sorted(set(files) - set(expected)))}; "
            "run `manage.py build_image` (or import it again) on a host that holds it."
        )
    _bad_files_delete(host=host, present=present, expected=expected, locations=locations, op=op)
    now = timezone.now()
    sources = [row for row in image_holders(image, exclude=host) if host_is_up(row.host, now)]
    if not sources:
        raise ImageUnavailable(
            f"Image {image.name} is not on host {host.name} and no other host that is up holds a verified copy.",
            details={"image": image.name, "host": host.name},
        )
    from vms.transfer import TransferError, host_file_copy

    failures: dict[str, str] = {}
    for source in sources:
        started = time.monotonic()
        try:
            for role in sorted(files):
                root, path = locations[role]
                _log(op, f"copying {role} of {image.name} from host {source.host.name} ({root}/{path})")
                host_file_copy(source=source.host, target=host, root=root, path=path, sha256=expected[role])
        except TransferError as exc:
            failures[source.host.name] = exc.message
            _log(op, f"copy from host {source.host.name} failed: {exc.message}")
            if exc.code in ("checksum_mismatch", "size_mismatch", "not_found"):
                _source_suspect(source, why=f"a copy to host {host.name} failed: {exc.message}")
            continue
        row = image_copy_refresh(host=host, image=image)
        if row is None or row.status != HostImage.Status.PRESENT:
            failures[source.host.name] = f"the copy does not verify here ({row.error if row else 'no files'})"
            _log(op, f"copy from host {source.host.name} does not verify here")
            continue
        size = sum(int(entry.get("size", 0)) for entry in row.files.values())
        _log(op, f"image {image.name} copied from host {source.host.name}: {size >> 20} MiB, sha256 verified", 8)
        audit_record(
            actor=None,
            action="image.copy",
            obj=image,
            after={"host": host.name, "source": source.host.name, "sha256": expected},
            message=f"{size} bytes in {time.monotonic() - started:.1f}s",
        )
        return source.host.name
    raise ImageUnavailable(
        f"Image {image.name} could not be copied to host {host.name}: "
        + "; ".join(f"{name}: {why}" for name, why in failures.items()),
        details={"image": image.name, "host": host.name, "sources": failures},
    )


def _log(op: Operation | None, line: str, progress: int | None = None) -> None:
    if op is not None:
        operation_log(op, line, progress=progress)
    logger.info("%s", line)


def _bad_files_delete(*, host: Host, present: HostImage | None, expected: dict, locations: dict, op) -> None:
    """Delete this host's files of the image that do not hash to the canonical value (through
    its hostd, which owns its roots): the copy then writes them whole."""
    from vms.transfer import host_file_delete

    for role, entry in (present.files if present is not None else {}).items():
        if entry.get("sha256") == expected.get(role):
            continue
        root, path = locations[role]
        _log(op, f"deleting the corrupt {role} here ({root}/{path})")
        host_file_delete(host=host, root=root, path=path)


def _source_suspect(source: HostImage, *, why: str) -> None:
    """A source whose copy did not verify: not a source again until its own inventory pass
    (its hash cache dropped here) finds its files good."""
    host_image_record(host=source.host, image=source.image, status=HostImage.Status.CORRUPT, files={}, error=why[:500])


@contextmanager
def _image_lock(image: Image):
    """One copy of an image at a time on this machine (a lock file under the runtime directory;
    waited for at most SANDBOX_IMAGE_COPY_TIMEOUT)."""
    directory = Path(settings.SANDBOX_RUNTIME_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / f".image-{image.pk}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + settings.SANDBOX_IMAGE_COPY_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ImageUnavailable(
                        f"Image {image.name} is being copied to this host by another operation for too long."
                    ) from None
                time.sleep(LOCK_POLL_SECONDS)
        yield
    finally:
        os.close(fd)
