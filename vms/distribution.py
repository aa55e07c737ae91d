"""Images copied to a host on demand, verified by SHA-256.

Placement does not refuse a host that lacks a VM's image (``vms.placement``): before a VMM
starts or restores there (the operations in ``IMAGE_ACTIONS``; ``vms.operations.operation_run``
calls this first), the worker of that host checks its copy against the image's canonical hashes
(``vms.inventory``). When files are missing or do not match, it deletes the bad ones through its
own hostd and hands the operation to a control-plane worker (``SANDBOX_TRANSFER_QUEUE``:
hypervisor hosts' certificates cannot call another host's hostd): ``image_copy_step`` copies
each file from a host holding a verified copy (``vms.transfer.host_file_copy``: relayed between
the two hostds, committed on the target only when the bytes hash to the canonical SHA-256),
audits it (``image.copy``) and hands the operation back to the VM's host, whose worker checks
the copy again, records it in the inventory and goes on with the operation. The operation log
says each step.

A source whose file does not hash to the canonical value is marked ``corrupt`` (its hash cache
dropped, so its own next inventory pass hashes it again) and the next source is tried; when none
is left the operation fails with ``image_unavailable`` and each source's reason, and the VM goes
to ``error`` (like any failed boot). An image without recorded hashes (built before they were
kept) is assumed to be on every host, as it was before inventories: neither checked nor copied.
"""

from __future__ import annotations

import logging
import time

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
from vms.models import VM, Host, HostImage, Image, Operation, VmState
from vms.operations import OperationHandoff, operation_log
from vms.selectors import host_is_up

logger = logging.getLogger(__name__)

# Operations that start or restore a VMM on the VM's host: its image must be there first.
IMAGE_ACTIONS = frozenset({"create", "start", "clone", "restore", "golden_build"})
# The VM states in which those operations are about to boot (else a redelivery after the boot).
_BOOTING = (VmState.CREATING, VmState.STARTING)
# A copy copes with every state of a copy here: all files present and matching the hashes known.
_USABLE = (HostImage.Status.PRESENT, HostImage.Status.UNVERIFIED)


class ImageUnavailable(ApplicationError):
    """The VM's image is not on its host and could not be copied there."""

    code = "image_unavailable"
    status_code = 409


def image_ensure_here(*, op: Operation, vm: VM) -> None:
    """On the VM's host, before its VMM starts or restores: return when the VM's image is here
    and matches its canonical hashes; else delete the bad files and hand ``op`` to the
    control plane to copy it (``OperationHandoff``). Raises ``ImageUnavailable`` (the VM then in
    ``error``) when it cannot be had."""
    image = vm.boot_image
    host = vm.host
    if vm.state not in _BOOTING or host is None or host.name != settings.SANDBOX_HOST_NAME:
        return
    if not image_expected_sha256(image):
        return
    row = image_copy_refresh(host=host, image=image)
    if row is not None and row.status in _USABLE:
        if str(image.pk) in (op.params or {}).get("image_copied", []):
            operation_log(op, f"image {image.name} verified on this host", progress=9)
        return
    if str(image.pk) in (op.params or {}).get("image_copied", []):
        _fail(vm, ImageUnavailable(f"Image {image.name} was copied to host {host.name} but does not verify there."))
    why = "is not on this host" if row is None else f"is corrupt on this host ({row.error})"
    try:
        image_copy_check(image)
        _bad_files_delete(host=host, image=image, present=row, op=op)
    except ApplicationError as exc:
        _fail(vm, exc)
    raise OperationHandoff(
        settings.SANDBOX_TRANSFER_QUEUE,
        {**op.params, "image_copy": {"image": str(image.pk), "back": host.queue}},
        f"image {image.name} {why}: a control-plane worker copies it from another host",
    )


def image_copy_step(op: Operation, vm: VM) -> None:
    """On a control-plane worker (``SANDBOX_TRANSFER_QUEUE``): copy the image ``op`` waits for
    to the VM's host, then hand ``op`` back to that host (``OperationHandoff``). Raises
    ``ImageUnavailable`` (the VM then in ``error``) when no source gives a verified copy."""
    wanted = op.params["image_copy"]
    image = Image.objects.filter(pk=wanted.get("image")).first()
    host = vm.host
    try:
        if host is None or image is None:
            raise ImageUnavailable("The VM's host or image no longer exists.")
        source = image_copy_to(host=host, image=image, op=op)
    except ApplicationError as exc:
        _fail(vm, exc)
    params = {key: value for key, value in op.params.items() if key != "image_copy"}
    params["image_copied"] = [*params.get("image_copied", []), str(image.pk)]
    raise OperationHandoff(
        wanted.get("back") or host.queue, params, f"image {image.name} copied from host {source}; back to {host.name}"
    )


def image_copy_check(image: Image) -> None:
    """Refuse (``ImageUnavailable``) an image whose files cannot travel: outside hostd's roots,
    or without a recorded SHA-256 for each."""
    files = image_files(image)
    missing = set(files) - set(image_expected_sha256(image))
    if missing:
        raise ImageUnavailable(
            f"Image {image.name} has no recorded SHA-256 for {', '.join(sorted(missing))}; "
            "run `manage.py build_image` (or import it again) on a host that holds it."
        )
    try:
        for path in files.values():
            image_file_location(path)
    except ValueError as exc:
        raise ImageUnavailable(f"Image {image.name} cannot be copied between hosts: {exc}.") from exc


def image_copy_to(*, host: Host, image: Image, op: Operation | None = None) -> str:
    """Copy ``image``'s files to ``host`` from the first up host holding a verified copy (run
    where the control plane's client certificate is: it relays between the two hostds);
    returns that host's name. Files ``host`` already holds with the right bytes are kept."""
    image_copy_check(image)
    expected = image_expected_sha256(image)
    locations = {role: image_file_location(path) for role, path in image_files(image).items()}
    now = timezone.now()
    sources = [row for row in image_holders(image, exclude=host) if host_is_up(row.host, now)]
    if not sources:
        raise ImageUnavailable(
            f"Image {image.name} is not on host {host.name} and no other host that is up holds a verified copy.",
            details={"image": image.name, "host": host.name},
        )
    from vms.transfer import TransferError, host_file_copy_report

    failures: dict[str, str] = {}
    for source in sources:
        started = time.monotonic()
        size = 0
        try:
            for role in sorted(locations):
                root, path = locations[role]
                _log(op, f"copying {role} of {image.name} from host {source.host.name} ({root}/{path})")
                try:
                    result = host_file_copy_report(
                        source=source.host, target=host, root=root, path=path, sha256=expected[role]
                    )
                except TransferError as exc:
                    if (exc.details or {}).get("reason") != "exists":
                        raise
                    # Another operation's copy of the same file landed first: it is kept
                    # when its bytes are the right ones (checked by a second pass).
                    result = host_file_copy_report(
                        source=source.host, target=host, root=root, path=path, sha256=expected[role]
                    )
                size += result.size
        except TransferError as exc:
            failures[source.host.name] = exc.message
            _log(op, f"copy from host {source.host.name} failed: {exc.message}")
            if exc.code in ("checksum_mismatch", "size_mismatch", "not_found"):
                _source_suspect(source, why=f"a copy to host {host.name} failed: {exc.message}")
            continue
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


def _fail(vm: VM, exc: ApplicationError) -> None:
    """The VM's boot cannot happen: the VM to ``error`` (as a failed boot), then raise."""
    from vms.lifecycle import vm_fail

    vm_fail(vm, f"boot failed: {exc.message}", expected=set(_BOOTING))
    raise exc


def _log(op: Operation | None, line: str, progress: int | None = None) -> None:
    if op is not None:
        operation_log(op, line, progress=progress)
    logger.info("%s", line)


def _bad_files_delete(*, host: Host, image: Image, present: HostImage | None, op) -> None:
    """Delete this host's files of the image that do not hash to the canonical value (through
    its own hostd, which owns its roots): the copy then writes them whole."""
    from vms.transfer import host_file_delete

    expected = image_expected_sha256(image)
    for role, entry in (present.files if present is not None else {}).items():
        if entry.get("sha256") == expected.get(role):
            continue
        root, path = image_file_location(image_files(image)[role])
        _log(op, f"deleting the corrupt {role} here ({root}/{path})")
        host_file_delete(host=host, root=root, path=path)


def _source_suspect(source: HostImage, *, why: str) -> None:
    """A source whose copy did not verify: not a source again until its own inventory pass
    (its hash cache dropped here) finds its files good."""
    host_image_record(host=source.host, image=source.image, status=HostImage.Status.CORRUPT, files={}, error=why[:500])
