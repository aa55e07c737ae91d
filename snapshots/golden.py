"""Golden snapshots: the business rules (the worker step is ``snapshots.lifecycle.golden_build_run``).

A golden snapshot is a memory+disk snapshot of a VM of a template, booted once on a host until
its guest agent answered. A create from that template (``vms.services.vm_create``, through the
``vm_create_source`` hook) then restores it into the new VM with the clone path
(``snapshots.lifecycle.snapshot_clone_run``: its own hostname, machine-id, MAC, address, clock
and entropy) instead of booting a kernel. Cold boot stays for templates with
``golden_snapshot`` off, VMs whose size or image differ from the snapshot's, and as the
fallback when the snapshot is missing, fails verification or cannot be restored (the create's
operation log says why, and the golden snapshot is marked failed).

- ``golden_build``: record a builder VM (owned by the system account, never shown to users)
  and its ``golden_build`` operation on the host's queue.
- ``golden_maintain`` (beat, per host): build the missing ones, rebuild the stale ones (the
  template's image or sizes changed since) and failed ones after ``SANDBOX_GOLDEN_RETRY_SECONDS``,
  and delete replaced golden snapshots once no VM's disk sits on them any more. A current golden
  snapshot of another up host is copied instead of built (``golden_copy_request``: by a
  control-plane worker, ``golden_copy``; it builds when the copy fails).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from accounts.audit import audit_record
from accounts.permissions import require_perm
from sandbox_site.errors import ApplicationError, ConflictError
from snapshots.models import GoldenSnapshot, Snapshot
from vms import hypervisor
from vms import services as vm_services
from vms.models import VM, Image, Operation, Template, VmPurpose, VmState
from vms.operations import operation_enqueue, operation_new
from vms.placement import host_runs_image

logger = logging.getLogger(__name__)
S = VmState
GOLDEN_SNAPSHOT_NAME = "golden"


def golden_inputs(template: Template) -> tuple[str, str]:
    """``(image_version, inputs)``: the image a golden snapshot of ``template`` is built from,
    and a digest of everything a restore must match (image, sizes, hotplug room, command line,
    driver). A golden snapshot whose ``inputs`` differ from the template's current ones is stale."""
    image = template.image
    version = f"{image.name}@{image.digest or image.sha256 or image.rootfs_path}"[:200]
    raw = [
        version,
        image.boot_mode,
        template.vcpus,
        template.max_vcpus,
        template.memory_mib,
        template.max_memory_mib,
        template.disk_gib,
        template.kernel_cmdline,
        hypervisor.driver_name_select(),
    ]
    return version, hashlib.sha256(json.dumps(raw).encode()).hexdigest()


def golden_build(*, template: Template, actor, host=None, reason: str = "") -> GoldenSnapshot:
    """Ask for a (re)build of ``template``'s golden snapshot on ``host`` (default: this one).
    Idempotent while a build is under way. ``actor`` None: the system (beat, image build)."""
    if actor is not None:
        require_perm(
            actor,
            "vms.change_template",
            None,
            action="golden.build",
            message="Only operators may build golden snapshots.",
        )
    image = template.image
    if image.status != Image.Status.READY:
        raise ConflictError(f"The template's image {image.name} is {image.status}.", details={"image": image.status})
    host = host or vm_services.local_host()
    version, inputs = golden_inputs(template)
    with transaction.atomic():
        # The builder boots like any VM: only on a host with room (its row lock first).
        vm_services.host_admission_check(host=host, vcpus=template.vcpus, memory_mib=template.memory_mib)
        GoldenSnapshot.objects.get_or_create(template=template, host=host)
        golden = GoldenSnapshot.objects.select_for_update().get(template=template, host=host)
        if golden.status == GoldenSnapshot.Status.BUILDING and golden.operation:
            busy = Operation.objects.filter(
                pk=golden.operation, status__in=[Operation.Status.PENDING, Operation.Status.RUNNING]
            ).exists()
            if busy:
                return golden
        vm = vm_services.system_vm_new(
            purpose=VmPurpose.GOLDEN, template=template, host=host, size=template, metadata={"golden_of": template.name}
        )
        op = operation_new(
            vm=vm,
            action="golden_build",
            actor=actor,
            params={"golden": str(golden.pk), "inputs": inputs, "image_version": version},
        )
        before = {"status": golden.status, "image_version": golden.image_version}
        golden.status = GoldenSnapshot.Status.BUILDING
        golden.operation = op.pk
        golden.error = ""
        golden.requested_at = timezone.now()
        golden.save(update_fields=["status", "operation", "error", "requested_at"])
        audit_record(
            actor=actor,
            action="golden.build",
            obj=golden,
            before=before,
            after={"template": template.name, "image_version": version, "operation": str(op.pk), "reason": reason},
        )
        operation_enqueue(op, vm)
    return golden


def golden_mark_failed(golden_id, why: str) -> bool:
    """A create found the golden snapshot unusable: no further create tries it (they cold
    boot) until it is rebuilt. False when it was not ready (already marked, or rebuilding)."""
    with transaction.atomic():
        marked = GoldenSnapshot.objects.filter(pk=golden_id, status=GoldenSnapshot.Status.READY).update(
            status=GoldenSnapshot.Status.FAILED, error=why[:2000]
        )
        if marked:
            golden = GoldenSnapshot.objects.select_related("template", "host").get(pk=golden_id)
            audit_record(actor=None, action="golden.failed", obj=golden, message=why[:2000])
    return bool(marked)


def golden_usable(*, template: Template, host_id, vcpus: int, memory_mib: int, disk_gib: int) -> GoldenSnapshot | None:
    """The ready, current golden snapshot of ``template`` on the host that a VM of that size
    can restore, or None (cold boot)."""
    if not template.golden_snapshot:
        return None
    golden = (
        GoldenSnapshot.objects.select_related("snapshot")
        .filter(template=template, host_id=host_id, status=GoldenSnapshot.Status.READY)
        .first()
    )
    if golden is None or golden.snapshot is None or golden.snapshot.state != Snapshot.State.READY:
        return None
    snap = golden.snapshot
    if (snap.vcpus, snap.memory_mib, snap.disk_gib) != (vcpus, memory_mib, disk_gib):
        return None  # a memory image restores only into the size it was taken at
    if golden.inputs != golden_inputs(template)[1]:
        return None  # stale: golden_maintain rebuilds it
    return golden


def golden_holders(*, template: Template) -> set:
    """Hook ``host_golden_holders``: ids of the hosts holding a ready, current golden snapshot
    of ``template`` (placement prefers them among equally roomy hosts)."""
    if not template.golden_snapshot:
        return set()
    return set(
        GoldenSnapshot.objects.filter(
            template=template,
            status=GoldenSnapshot.Status.READY,
            inputs=golden_inputs(template)[1],
            snapshot__state=Snapshot.State.READY,
        ).values_list("host_id", flat=True)
    )


def golden_create_source(*, vm: VM, start: bool):
    """Hook ``vm_create_source``: a create of a VM that the template's golden snapshot fits
    restores it (a ``clone`` operation marked ``golden``) instead of a cold ``create``."""
    if not start or vm.purpose != VmPurpose.USER or (vm.image_id and vm.image_id != vm.template.image_id):
        return None
    golden = golden_usable(
        template=vm.template, host_id=vm.host_id, vcpus=vm.vcpus, memory_mib=vm.memory_mib, disk_gib=vm.disk_gib
    )
    if golden is None:
        return None
    VM.objects.filter(pk=vm.pk).update(driver=golden.snapshot.driver)
    vm.driver = golden.snapshot.driver
    return "clone", {"snapshot": str(golden.snapshot_id), "golden": str(golden.pk)}


MANIFEST_MAX_BYTES = 1 << 20  # a snapshot's manifest lists a handful of files


def golden_copy_sources(*, template: Template, host, now=None) -> list[GoldenSnapshot]:
    """Ready, current golden snapshots of ``template`` on other up hosts, newest first."""
    from vms.selectors import host_is_up

    now = now or timezone.now()
    rows = (
        GoldenSnapshot.objects.select_related("snapshot", "host")
        .filter(
            template=template,
            status=GoldenSnapshot.Status.READY,
            inputs=golden_inputs(template)[1],
            snapshot__state=Snapshot.State.READY,
            host__is_active=True,
        )
        .exclude(host=host)
        .order_by("-built_at")
    )
    return [golden for golden in rows if host_is_up(golden.host, now)]


def golden_copy_request(*, template: Template, host, reason: str) -> GoldenSnapshot:
    """On ``host``'s worker (``golden_maintain``): ask a control-plane worker
    (``SANDBOX_TRANSFER_QUEUE``: hosts' certificates cannot call another hostd) to copy
    another host's golden snapshot of ``template`` here. The row is ``building`` without an
    operation meanwhile (``_build_reason`` waits ``SANDBOX_GOLDEN_COPY_TIMEOUT`` for it)."""
    from snapshots.tasks import golden_copy_task

    with transaction.atomic():
        GoldenSnapshot.objects.get_or_create(template=template, host=host)
        golden = GoldenSnapshot.objects.select_for_update().get(template=template, host=host)
        golden.status = GoldenSnapshot.Status.BUILDING
        golden.operation = None
        golden.error = ""
        golden.requested_at = timezone.now()
        golden.save(update_fields=["status", "operation", "error", "requested_at"])
        audit_record(actor=None, action="golden.copy", obj=golden, after={"template": template.name, "reason": reason})
        transaction.on_commit(
            lambda: golden_copy_task.apply_async(
                args=[str(template.pk), str(host.pk)], queue=settings.SANDBOX_TRANSFER_QUEUE
            )
        )
    return golden


def golden_copy(*, template: Template, host, now=None) -> GoldenSnapshot | None:
    """On a control-plane worker: copy a ready, current golden snapshot of ``template`` from
    another up host to ``host`` and record it as ``host``'s; when there is none to copy, or
    every copy fails (nothing half-copied stays), ask ``host`` to build its own instead.

    The image comes first (``vms.distribution.image_copy_to``: the snapshot's disk layer sits
    on it; files already there are kept). The manifest is read from the source and must hash
    to the source's recorded checksum; every file is then copied checked against the
    manifest's sha256 (``vms.transfer``), the manifest last. The directory keeps its name (the
    source snapshot's id) under the snapshot root: hosts share the directory layout (as moves
    require). A create on ``host`` verifies the whole snapshot again before it restores it."""
    from vms.distribution import image_copy_to
    from vms.hostd.client import HostdClient
    from vms.hostd.errors import HostdError
    from vms.hostd_address import hostd_address
    from vms.inventory import image_expected_sha256
    from vms.models import HostImage
    from vms.transfer import host_file_copy, host_file_delete
    from vms.vmm.snapshot import MANIFEST_FILE

    failures: list[str] = []
    for source in golden_copy_sources(template=template, host=host, now=now):
        snap = source.snapshot
        name = Path(snap.directory).name
        copied: list[str] = []
        try:
            image = template.image
            held = HostImage.objects.filter(host=host, image=image, status=HostImage.Status.PRESENT).exists()
            if image_expected_sha256(image) and not held:
                image_copy_to(host=host, image=image)
            manifest_path = f"{name}/{MANIFEST_FILE}"
            with HostdClient(hostd_address(source.host), timeout=60.0) as client:
                size = int(client.blob_stat("snapshots", manifest_path, sha256=False).get("size") or 0)
                if not 0 < size <= MANIFEST_MAX_BYTES:
                    raise ApplicationError(f"its manifest is missing or too large ({size} bytes)")
                raw = b"".join(client.blob_chunks("snapshots", manifest_path, size))
            if hashlib.sha256(raw).hexdigest() != snap.checksum:
                raise ApplicationError("its manifest does not match the recorded checksum")
            listed = json.loads(raw)["files"]
            for file, entry in sorted(listed.items()):
                host_file_copy(
                    source=source.host, target=host, root="snapshots", path=f"{name}/{file}", sha256=entry["sha256"]
                )
                copied.append(f"{name}/{file}")
            host_file_copy(source=source.host, target=host, root="snapshots", path=manifest_path, sha256=snap.checksum)
        except (ApplicationError, HostdError, ValueError, KeyError, TypeError) as exc:
            message = getattr(exc, "message", None) or str(exc)
            failures.append(f"{source.host.name}: {message}")
            logger.warning(
                "golden snapshot of %s not copied from host %s: %s", template.name, source.host.name, message
            )
            for path in copied:  # nothing half-copied stays behind
                try:
                    host_file_delete(host=host, root="snapshots", path=path)
                except ApplicationError:
                    logger.warning("could not delete %s on host %s", path, host.name, exc_info=True)
            continue
        files = {file: int(entry["size"]) for file, entry in listed.items()}
        directory = Path(settings.SANDBOX_SNAPSHOT_DIR) / name
        return _golden_copy_record(
            template=template, host=host, source=source, directory=directory, files=files, now=now or timezone.now()
        )
    why = "; ".join(failures) or "no other up host holds a current one"
    try:
        golden_build(template=template, actor=None, host=host, reason=f"not copied: {why}"[:500])
    except ConflictError as exc:
        GoldenSnapshot.objects.filter(template=template, host=host, operation__isnull=True).update(
            status=GoldenSnapshot.Status.FAILED, error=f"not copied ({why}); not built: {exc.message}"[:2000]
        )
    return None


def _golden_copy_record(
    *, template: Template, host, source: GoldenSnapshot, directory: Path, files: dict, now
) -> GoldenSnapshot:
    snap = source.snapshot
    with transaction.atomic():
        copy = Snapshot.objects.create(
            vm=None,
            vm_ref=uuid.uuid4(),  # a row of its own: its builder VM was on the source host
            vm_name=snap.vm_name,
            owner=snap.owner,
            project_id=snap.project_id,
            host=host,
            template=template,
            image=snap.image,
            name=GOLDEN_SNAPSHOT_NAME,
            include_memory=snap.include_memory,
            state=Snapshot.State.READY,
            driver=snap.driver,
            vmm_version=snap.vmm_version,
            directory=str(directory),
            disk_layer=str(directory / Path(snap.disk_layer).name) if snap.disk_layer else "",
            backing_chain=snap.backing_chain,
            shared_layer=snap.shared_layer,
            vcpus=snap.vcpus,
            memory_mib=snap.memory_mib,
            disk_gib=snap.disk_gib,
            size_bytes=snap.size_bytes,
            checksum=snap.checksum,
            files=files,
            verified_at=now,
        )
        GoldenSnapshot.objects.get_or_create(template=template, host=host)
        golden = GoldenSnapshot.objects.select_for_update().get(template=template, host=host)
        before = {"status": golden.status, "image_version": golden.image_version}
        golden.snapshot = copy
        golden.status = GoldenSnapshot.Status.READY
        golden.image_version = source.image_version
        golden.inputs = source.inputs
        golden.operation = None
        golden.error = ""
        golden.built_at = now
        golden.save()
        audit_record(
            actor=None,
            action="golden.copied",
            obj=golden,
            before=before,
            after={"snapshot": str(copy.pk), "source": source.host.name, "checksum": copy.checksum},
        )
    logger.info("golden snapshot of %s copied from host %s", template.name, source.host.name)
    return golden


def _build_reason(golden: GoldenSnapshot | None, inputs: str, now) -> str:
    """Why ``golden`` needs a build now, or "" when it does not."""
    if golden is None:
        return "missing"
    if golden.status == GoldenSnapshot.Status.BUILDING:
        if golden.operation is None and golden.requested_at > now - timedelta(
            seconds=settings.SANDBOX_GOLDEN_COPY_TIMEOUT
        ):
            return ""  # a control-plane worker copies it from another host (golden_copy)
        if (
            golden.operation
            and Operation.objects.filter(
                pk=golden.operation, status__in=[Operation.Status.PENDING, Operation.Status.RUNNING]
            ).exists()
        ):
            return ""
        return "the previous build was lost"
    if golden.status == GoldenSnapshot.Status.FAILED:
        retry = timedelta(seconds=settings.SANDBOX_GOLDEN_RETRY_SECONDS)
        return "failed earlier" if golden.requested_at <= now - retry else ""
    return "the template or its image changed" if golden.inputs != inputs else ""


def golden_maintain(*, host, now=None) -> dict[str, int]:
    """Beat job of ``host``: build missing, stale and (after a pause) failed golden
    snapshots of the active templates that want one (unless ``SANDBOX_GOLDEN_AUTO_BUILD`` is
    off); delete replaced ones nothing uses; then refill the warm pools (``snapshots.pool``)."""
    now = now or timezone.now()
    counts = {"requested": 0, "copy_requested": 0, "retired": 0}
    templates = Template.objects.filter(
        is_active=True, golden_snapshot=True, image__status=Image.Status.READY, image__deprecated_at__isnull=True
    ).select_related("image")
    for template in templates if settings.SANDBOX_GOLDEN_AUTO_BUILD else ():
        if not host_runs_image(host, template.image):
            continue  # this host's driver cannot boot it: no VM of it is placed here
        golden = GoldenSnapshot.objects.filter(template=template, host=host).first()
        reason = _build_reason(golden, golden_inputs(template)[1], now)
        if not reason:
            continue
        # Another host's current golden snapshot is copied (by the control plane) rather than
        # built again.
        if golden_copy_sources(template=template, host=host, now=now):
            golden_copy_request(template=template, host=host, reason=reason)
            counts["copy_requested"] += 1
            continue
        try:
            golden_build(template=template, actor=None, host=host, reason=reason)
            counts["requested"] += 1
        except ConflictError as exc:
            logger.warning("golden snapshot of %s not requested: %s", template.name, exc.message)
    counts["retired"] = golden_retired_delete(host=host)
    from snapshots.pool import pool_refill

    counts.update(pool_refill(host=host))
    return counts


def golden_retired_delete(*, host) -> int:
    """Delete the golden snapshots a rebuild replaced, once no VM's disk sits on them."""
    from snapshots.services import snapshot_delete

    retired = Snapshot.objects.filter(
        host=host,
        owner__username=vm_services.SYSTEM_USERNAME,
        name=GOLDEN_SNAPSHOT_NAME,
        state=Snapshot.State.READY,
        golden__isnull=True,
    )
    deleted = 0
    for snapshot in retired:
        try:
            snapshot_delete(snapshot=snapshot, actor=None, reason="golden snapshot replaced")
            deleted += 1
        except ConflictError:
            continue  # VMs still sit on its layer: tried again on the next pass
    return deleted
