"""Images as first-class objects: operators upload or register disks, users pick among the
ones they may see (services; the API and the admin call these).

- ``image_upload``: a disk sent with the request (streamed to a temporary file in the store).
- ``image_register``: a disk already on the host, under SANDBOX_IMAGE_IMPORT_DIR only (an
  API caller must not make the platform read ``/etc`` or another tenant's overlay); copied
  into the store, so the import directory can be cleaned afterwards.

Both check, before anything is recorded: the declared SHA-256, the size limits, and
``vms.vmm.image_check.inspect_disk_image`` (format, backing files, data files, encryption,
"is this a disk at all"). A refused disk leaves nothing behind: no file in the store, no row.
A kept disk is ``<SANDBOX_IMAGE_STORE>/<image id>.<format>``, read-only.

``image_deprecate`` hides an image from new VMs; ``image_delete`` is refused (409) while a
template or a VM uses it. Visibility: public images are seen by every signed-in user, private
ones by whoever holds ``vms.view_image`` (role or object permission); operators hold all rights.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone
from guardian.shortcuts import assign_perm

from accounts.audit import audit_record
from accounts.permissions import require_perm, visible_queryset
from sandbox_site.errors import ApplicationError, ConflictError
from vms.models import VM, BootMode, DiskFormat, Image, OsType, Template
from vms.vmm.image_check import ImageRejected, inspect_disk_image

CHUNK = 1 << 20


class ImageTooLarge(ApplicationError):
    code = "too_large"
    status_code = 413


def images_visible(user) -> QuerySet[Image]:
    """Images ``user`` may see and pick: public ones, and private ones they hold view on."""
    if not user.is_authenticated:
        return Image.objects.none()
    private = visible_queryset(user, Image.objects.all(), "view").values("pk")
    return Image.objects.filter(Q(is_public=True) | Q(pk__in=private))


def image_usable_check(*, image: Image, actor) -> None:
    """Refuse a new VM on ``image`` unless it is ready, not deprecated and visible to ``actor``."""
    if not images_visible(actor).filter(pk=image.pk).exists():
        raise ApplicationError("No such image.", code="not_found", status_code=404)
    if image.status != Image.Status.READY:
        raise ConflictError(f"Image {image.name} is not ready ({image.status}).", details={"image": image.status})
    if image.deprecated_at is not None:
        raise ConflictError(f"Image {image.name} is deprecated.", details={"image": "deprecated"})


def _store() -> Path:
    store = Path(settings.SANDBOX_IMAGE_STORE)
    store.mkdir(parents=True, exist_ok=True)
    return store


def _check_choices(*, disk_format: str, boot_mode: str, os_type: str) -> None:
    if disk_format not in DiskFormat.values:
        raise ApplicationError("disk_format must be raw or qcow2.", details={"disk_format": disk_format})
    if boot_mode not in BootMode.values:
        raise ApplicationError("boot_mode must be kernel or uefi.", details={"boot_mode": boot_mode})
    if os_type not in OsType.values:
        raise ApplicationError("os_type must be linux or windows.", details={"os_type": os_type})
    if boot_mode == BootMode.KERNEL:
        # A kernel-boot image needs the platform's kernel and initramfs; only built images have them.
        raise ApplicationError(
            "Uploaded and registered images boot through UEFI firmware (boot_mode uefi); "
            "direct kernel boot is for the images built here.",
            details={"boot_mode": boot_mode},
        )


def _write_stream(chunks: Iterable[bytes], dest: Path, *, limit: int) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(dest, "xb") as fh:
        for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise ImageTooLarge(f"Images are limited to {limit} bytes.", details={"limit": limit})
            digest.update(chunk)
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    return digest.hexdigest(), size


def _file_chunks(path: Path) -> Iterable[bytes]:
    with open(path, "rb") as fh:
        yield from iter(lambda: fh.read(CHUNK), b"")


def _image_create(
    *,
    actor,
    source: str,
    chunks: Iterable[bytes],
    name: str,
    sha256: str,
    disk_format: str,
    boot_mode: str = BootMode.UEFI,
    os_type: str = OsType.LINUX,
    min_disk_gib: int = 1,
    min_memory_mib: int = 256,
    description: str = "",
    is_public: bool = True,
) -> Image:
    require_perm(actor, "vms.add_image", None, action="image.create", message="Your role may not add images.")
    _check_choices(disk_format=disk_format, boot_mode=boot_mode, os_type=os_type)
    sha256 = (sha256 or "").strip().lower()
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ApplicationError("sha256 must be the file's SHA-256 as 64 hex digits.", details={"sha256": "invalid"})
    existing = Image.objects.filter(name=name).first()
    if existing is not None and existing.status != Image.Status.MISSING:
        raise ConflictError(f"An image named {name!r} exists.", details={"name": "taken"})
    image_id = existing.pk if existing is not None else uuid.uuid4()
    store = _store()
    tmp = store / f".incoming-{uuid.uuid4().hex}"
    final = store / f"{image_id}.{disk_format}"
    try:
        got, size = _write_stream(chunks, tmp, limit=settings.SANDBOX_IMAGE_MAX_UPLOAD_BYTES)
        if got != sha256:
            raise ApplicationError(
                "The file's SHA-256 does not match the one given.",
                code="checksum_mismatch",
                details={"expected": sha256, "actual": got},
            )
        try:
            info = inspect_disk_image(
                tmp,
                declared_format=disk_format,
                max_virtual_bytes=settings.SANDBOX_IMAGE_MAX_VIRTUAL_BYTES,
                max_file_bytes=settings.SANDBOX_IMAGE_MAX_UPLOAD_BYTES,
            )
        except ImageRejected as exc:
            reason = (exc.details or {}).get("reason", "invalid") if isinstance(exc.details, dict) else "invalid"
            status = 413 if reason == "too_large" else 400
            raise ApplicationError(
                exc.message, code=f"image_{reason}", details=exc.details, status_code=status
            ) from exc
        if boot_mode == BootMode.UEFI and info.layout == "ext4":
            raise ApplicationError(
                "A UEFI image must be a whole disk (GPT or MBR), not a bare filesystem.",
                code="image_not_bootable",
            )
        os.chmod(tmp, 0o444)
        os.replace(tmp, final)
        with transaction.atomic():
            image = existing or Image(pk=image_id, name=name)
            image.description = description
            image.os_type = os_type
            image.boot_mode = boot_mode
            image.disk_format = disk_format
            image.status = Image.Status.READY
            image.source = source
            image.rootfs_path = str(final)
            image.kernel_path = ""
            image.initramfs_path = ""
            image.sha256 = got
            image.file_sha256 = {"rootfs": got}
            image.size_bytes = size
            image.virtual_size_bytes = info.virtual_bytes
            image.min_disk_gib = max(min_disk_gib, -(-info.virtual_bytes // (1 << 30)))
            image.min_memory_mib = min_memory_mib
            image.is_public = is_public
            image.created_by = actor
            image.full_clean()
            image.save()
            for codename in Image.object_permission_codenames():
                assign_perm(f"vms.{codename}", actor, image)
            audit_record(
                actor=actor,
                action=f"image.{source}",
                obj=image,
                after={"name": name, "sha256": got, "format": disk_format, "boot_mode": boot_mode, "os_type": os_type},
            )
        return image
    except BaseException:
        for leftover in (tmp, final):
            if leftover.exists() and (leftover == tmp or not Image.objects.filter(rootfs_path=str(final)).exists()):
                leftover.unlink()
        raise


def image_upload(*, actor, chunks: Iterable[bytes], **fields) -> Image:
    """Record an image from an uploaded disk (see the module docstring for the checks)."""
    return _image_create(actor=actor, source=Image.Source.UPLOADED, chunks=chunks, **fields)


def image_register(*, actor, path: str, **fields) -> Image:
    """Record an image from a disk under SANDBOX_IMAGE_IMPORT_DIR (``path`` relative to it),
    copied into the store. Symlinks and paths leaving the import directory are refused."""
    root = Path(settings.SANDBOX_IMAGE_IMPORT_DIR).resolve()
    candidate = Path(path)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise ApplicationError("path must be relative to the import directory.", details={"path": path})
    source = root / candidate
    if source.is_symlink() or not source.resolve().is_relative_to(root) or not source.is_file():
        raise ApplicationError(
            "No such file in the import directory.", code="not_found", details={"path": path}, status_code=404
        )
    return _image_create(actor=actor, source=Image.Source.REGISTERED, chunks=_file_chunks(source), **fields)


def image_update(*, image: Image, actor, **fields) -> Image:
    """Change the description, minimum sizes or visibility of ``image``."""
    require_perm(actor, "vms.change_image", image, action="image.update")
    allowed = {"description", "min_disk_gib", "min_memory_mib", "is_public"}
    before = {key: getattr(image, key) for key in allowed}
    for key, value in fields.items():
        if key in allowed and value is not None:
            setattr(image, key, value)
    image.full_clean()
    image.save()
    audit_record(actor=actor, action="image.update", obj=image, before=before, after={k: fields[k] for k in fields})
    return image


def image_deprecate(*, image: Image, actor, deprecated: bool = True) -> Image:
    """Hide ``image`` from new VMs (VMs and templates that have it keep working), or undo it."""
    require_perm(actor, "vms.change_image", image, action="image.deprecate")
    image.deprecated_at = timezone.now() if deprecated else None
    image.save(update_fields=["deprecated_at", "updated_at"])
    audit_record(actor=actor, action="image.deprecate", obj=image, after={"deprecated": deprecated})
    return image


def image_users(image: Image) -> dict[str, list[str]]:
    """Names of the templates and ids of the VMs (a VM through its template too) and
    snapshots that boot ``image``."""
    templates = list(Template.objects.filter(image=image).values_list("name", flat=True))
    vms = VM.objects.filter(Q(image=image) | Q(image__isnull=True, template__image=image))
    users = {"templates": templates, "vms": [str(pk) for pk in vms.values_list("pk", flat=True)[:50]]}
    snapshots = image.snapshots.values_list("pk", flat=True)[:50]
    if snapshots:
        users["snapshots"] = [str(pk) for pk in snapshots]  # clones of them would boot it
    return users


def image_delete(*, image: Image, actor) -> None:
    """Delete ``image`` and its disk in the store; refused (409) while a template or VM uses it.
    Built images' cache directories are left to ``build_image`` (they are shared)."""
    require_perm(actor, "vms.delete_image", image, action="image.delete")
    with transaction.atomic():
        locked = Image.objects.select_for_update().get(pk=image.pk)
        users = image_users(locked)
        if users["templates"] or users["vms"] or users.get("snapshots"):
            raise ConflictError(f"Image {locked.name} is in use.", details=users)
        disk = Path(locked.rootfs_path) if locked.rootfs_path else None
        audit_record(
            actor=actor, action="image.delete", obj=locked, before={"name": locked.name, "sha256": locked.sha256}
        )
        locked.delete()
    store = Path(settings.SANDBOX_IMAGE_STORE).resolve()
    if disk is not None and disk.resolve().parent == store and disk.exists():
        disk.chmod(0o644)
        disk.unlink()
