"""Which images each host holds (``HostImage`` rows), as the host's own worker finds them.

An image is one to three files (``image_files``: the base disk, and for direct kernel boot the
kernel and initramfs). Its canonical hashes are ``Image.file_sha256``, recorded when it is
built or imported (``image_file_sha256_record``). Each host's worker checks its copies
(``host_inventory_update``, from its inventory loop, ``vms.tasks``): a file is hashed again only
when its size or modification time changed (the row keeps ``path, size, mtime_ns, sha256`` of
each file), so a pass over unchanged images is a few ``stat`` calls.

A copy whose files all match is ``present`` (a source for other hosts, ``vms.distribution``);
a missing or mismatching file makes it ``corrupt`` (never a source; copied again when a VM needs
the image there); an image without recorded hashes is ``unverified`` (built before hashes were
kept: run ``manage.py build_image`` again to record them). No row: the host does not hold it.

What a host's driver can boot (``Host.driver``, ``Host.boot_modes``) comes with its heartbeat
(``vms.operations.host_heartbeat``); golden snapshots are per host already
(``snapshots.GoldenSnapshot``).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from django.db import IntegrityError, transaction
from django.utils import timezone

from vms.models import BootMode, Host, HostImage, Image
from vms.transfer import host_roots, root_of
from vms.vmm.snapshot import sha256_file

logger = logging.getLogger(__name__)


def image_files(image: Image) -> dict[str, Path]:
    """The files ``image`` boots from, by role: ``rootfs`` always; ``kernel`` and
    ``initramfs`` for direct kernel boot (firmware boot reads only the disk)."""
    files = {"rootfs": image.rootfs_path}
    if image.boot_mode == BootMode.KERNEL:
        files.update(kernel=image.kernel_path, initramfs=image.initramfs_path)
    return {role: Path(path) for role, path in files.items() if path}


def image_expected_sha256(image: Image) -> dict[str, str]:
    """The canonical SHA-256 of each of ``image``'s files (empty: none recorded)."""
    expected = {role: digest for role, digest in (image.file_sha256 or {}).items() if digest}
    if image.sha256 and "rootfs" not in expected:
        expected["rootfs"] = image.sha256  # uploaded before file_sha256 existed
    return expected


def image_file_sha256_record(image: Image) -> dict[str, str]:
    """Hash ``image``'s files on this machine and keep them as the canonical hashes (an image
    built or imported here). Saves ``file_sha256`` and ``sha256`` (the base disk's)."""
    hashes = {role: sha256_file(path) for role, path in image_files(image).items()}
    image.file_sha256 = hashes
    image.sha256 = hashes.get("rootfs", image.sha256)
    Image.objects.filter(pk=image.pk).update(file_sha256=hashes, sha256=image.sha256)
    return hashes


def _file_state(role: str, path: Path, cached: dict) -> dict | None:
    """``{path, size, mtime_ns, sha256}`` of one file here (hashed only when its path, size or
    modification time differ from ``cached``), or None when it is not a regular file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    entry = cached.get(role) or {}
    same = (entry.get("path"), entry.get("size"), entry.get("mtime_ns")) == (str(path), st.st_size, st.st_mtime_ns)
    if same and entry.get("sha256"):
        return dict(entry)
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}


def image_copy_check(image: Image, *, cached: dict | None = None) -> tuple[str, dict, str] | None:
    """``(status, files, error)`` of this machine's copy of ``image``, or None when none of its
    files is here. ``cached``: the files of its ``HostImage`` row (hashes reused while size and
    modification time are unchanged)."""
    cached = cached or {}
    expected = image_expected_sha256(image)
    files: dict[str, dict] = {}
    problems: list[str] = []
    for role, path in image_files(image).items():
        state = _file_state(role, path, cached)
        if state is None:
            problems.append(f"{role} missing ({path})")
            continue
        files[role] = state
        want = expected.get(role)
        if want and state["sha256"] != want:
            problems.append(f"{role} has sha256 {state['sha256'][:12]}…, expected {want[:12]}…")
    if not files:
        return None
    if problems:
        return HostImage.Status.CORRUPT, files, "; ".join(problems)[:500]
    if set(expected) < set(files):
        return HostImage.Status.UNVERIFIED, files, ""
    return HostImage.Status.PRESENT, files, ""


def host_image_record(*, host: Host, image: Image, status: str, files: dict, error: str = "", now=None) -> HostImage:
    """Create or update ``host``'s ``HostImage`` row for ``image``; a copy that turns corrupt
    is logged (an operator sees it in the host's ``images``)."""
    now = now or timezone.now()
    for attempt in range(2):
        try:
            with transaction.atomic():  # a savepoint inside a caller's transaction
                row = HostImage.objects.select_for_update().filter(host=host, image=image).first()
                was = row.status if row is not None else None
                if row is None:
                    row = HostImage(host=host, image=image)
                row.status, row.files, row.error, row.verified_at = status, files, error, now
                row.save()
            break
        except IntegrityError:
            # Another process (the inventory pass, another create) recorded it between the read
            # and the insert: a missing row locks nothing. Its row is committed now; update it.
            if attempt:
                raise
    if status == HostImage.Status.CORRUPT and was != status:
        logger.error("image %s on host %s is corrupt: %s", image.name, host.name, error)
    return row


def image_copy_refresh(*, host: Host, image: Image) -> HostImage | None:
    """Check this machine's copy of ``image`` now and record it for ``host`` (this machine's
    host); None (and no row) when no file of it is here."""
    row = HostImage.objects.filter(host=host, image=image).first()
    result = image_copy_check(image, cached=row.files if row is not None else None)
    if result is None:
        HostImage.objects.filter(host=host, image=image).delete()
        return None
    status, files, error = result
    if row is not None and (row.status, row.files, row.error) == (status, files, error):
        return row
    return host_image_record(host=host, image=image, status=status, files=files, error=error)


def host_inventory_update(host: Host) -> dict[str, int]:
    """The worker's inventory pass on its own host: check every ready image's files here and
    record what it holds (counts by status, and ``gone``: rows of images no longer here)."""
    counts = {"present": 0, "corrupt": 0, "unverified": 0, "gone": 0}
    rows = {row.image_id: row for row in HostImage.objects.filter(host=host)}
    seen = set()
    for image in Image.objects.filter(status=Image.Status.READY).exclude(rootfs_path=""):
        row = rows.get(image.pk)
        try:
            result = image_copy_check(image, cached=row.files if row is not None else None)
        except OSError as exc:  # unreadable: say so rather than stop the pass
            result = (HostImage.Status.CORRUPT, row.files if row is not None else {}, f"unreadable: {exc}"[:500])
        if result is None:
            continue
        seen.add(image.pk)
        status, files, error = result
        if row is None or (row.status, row.files, row.error) != (status, files, error):
            host_image_record(host=host, image=image, status=status, files=files, error=error)
        else:
            HostImage.objects.filter(pk=row.pk).update(verified_at=timezone.now())
        counts[status] += 1
    gone = [pk for pk in rows if pk not in seen]
    if gone:
        counts["gone"] = HostImage.objects.filter(host=host, image_id__in=gone).delete()[0]
    return counts


def image_holders(image: Image, *, exclude: Host | None = None) -> list[HostImage]:
    """Present (verified) copies of ``image`` on active hosts, most recently verified first:
    the sources a copy may come from."""
    rows = HostImage.objects.filter(image=image, status=HostImage.Status.PRESENT, host__is_active=True)
    if exclude is not None:
        rows = rows.exclude(host=exclude)
    return list(rows.select_related("host").order_by("-verified_at"))


def image_file_location(path: Path) -> tuple[str, str]:
    """``(root, relative path)`` of an image file under one of hostd's blob roots
    (``images``: SANDBOX_IMAGE_DIR, built images; ``image_store``: SANDBOX_IMAGE_STORE,
    uploaded and registered ones). ValueError for a file outside them."""
    roots = host_roots()
    found = root_of(path, {name: roots[name] for name in ("images", "image_store")})
    if found is not None:
        return found
    raise ValueError(f"{path} is under neither SANDBOX_IMAGE_DIR nor SANDBOX_IMAGE_STORE")
