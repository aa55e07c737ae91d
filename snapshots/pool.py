"""Warm pools: the business rules (worker steps in ``snapshots.lifecycle``).

Per template, ``Template.pool_size`` VMs restored from the template's golden snapshot are kept
ready on each host, paused. They belong to the system account with ``purpose=pool``: nobody
sees them (``VM.users_may_see``), they count against the host (paused VMs hold their memory)
but against no user's quota. A create that fits (``vm_create`` through the ``vm_pool_take``
hook, under the owner's quota lock, after the quota check) takes one with a compare-and-set
(``pool`` -> ``user``, ``paused`` -> ``starting``): it gets its owner, name, metadata and
permissions at once, and its ``pool_take`` operation applies the new owner's network rules,
resumes it and gives it its identity (hostname, clock, entropy; machine-id, MAC and address
are its own since the restore). The beat job refills the pools while the host has room.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from accounts.audit import audit_record
from snapshots.golden import golden_usable
from snapshots.models import GoldenSnapshot
from vms import services as vm_services
from vms.events import vm_event_publish
from vms.models import VM, Host, Operation, ResourceSample, Template, VmPurpose, VmState
from vms.operations import operation_enqueue, operation_new
from vms.transitions import vm_transition_request

logger = logging.getLogger(__name__)
S = VmState


def pool_host_has_room(host: Host, *, vcpus: int, memory_mib: int) -> bool:
    """Whether ``host`` admits one more VM of this size (``vms.admission``: capacity x
    overcommit minus the host's reserve, pool VMs included) and still keeps
    ``SANDBOX_POOL_HOST_RESERVE_MIB`` of what it admits free for users' own creates."""
    room = vm_services.host_room(host)
    needed = vm_services.vm_claim_mib(memory_mib) + settings.SANDBOX_POOL_HOST_RESERVE_MIB
    return vcpus <= room.vcpus_free and needed <= room.memory_free_mib


def pool_vm_take(*, owner, project, vm_name: str, template: Template, image, vcpus: int, memory_mib: int, disk_gib: int,
                 metadata: dict | None, start: bool, actor):  # fmt: skip
    """Hook ``vm_pool_take`` (inside ``vm_create``'s transaction, after its quota and name
    checks): take a paused pool VM of ``template`` on this host that fits, or None. The
    compare-and-set makes two creates never take the same VM (the loser tries the next)."""
    if not start or (image is not None and image.pk != template.image_id) or template.pool_size <= 0:
        return None
    host = vm_services.local_host()
    golden = golden_usable(template=template, host_id=host.pk, vcpus=vcpus, memory_mib=memory_mib, disk_gib=disk_gib)
    if golden is None:
        return None  # none, stale or failed: its pool VMs are discarded by the next refill
    candidates = VM.objects.filter(
        metadata__golden_snapshot=str(golden.snapshot_id),
        purpose=VmPurpose.POOL,
        state=S.PAUSED,
        template=template,
        host=host,
        vcpus=vcpus,
        memory_mib=memory_mib,
        disk_gib=disk_gib,
    ).order_by("created_at")
    for pk in candidates.values_list("pk", flat=True)[:5]:
        won = VM.objects.filter(pk=pk, purpose=VmPurpose.POOL, state=S.PAUSED).update(
            purpose=VmPurpose.USER,
            owner=owner,
            project=project,
            name=vm_name,
            metadata=metadata or {},
            state=S.STARTING,
            created_at=timezone.now(),
            updated_at=timezone.now(),
        )
        if not won:
            continue  # another create took it first
        vm = VM.objects.select_related("template", "host", "owner").get(pk=pk)
        vm.full_clean()  # the name, as for a new row (an error rolls the take back)
        # Its history as a pool VM stays the system's: the new owner sees only their create.
        Operation.objects.filter(vm=vm).update(vm=None)
        ResourceSample.objects.filter(vm=vm).delete()
        from guardian.models import UserObjectPermission

        UserObjectPermission.objects.filter(
            content_type__app_label="vms", content_type__model="vm", object_pk=str(vm.pk)
        ).delete()
        vm_services.vm_row_permissions_grant(vm=vm)
        op = operation_new(vm=vm, action="pool_take", actor=actor, params={"pooled": True})
        operation_enqueue(op, vm)
        transaction.on_commit(lambda taken=vm: vm_event_publish(taken))  # the owner's dashboards learn of it
        return vm, op
    return None


def _pool_fill_one(template: Template, host: Host, golden: GoldenSnapshot) -> VM:
    snap = golden.snapshot
    with transaction.atomic():
        vm = vm_services.system_vm_new(
            purpose=VmPurpose.POOL,
            template=template,
            host=host,
            size=snap,
            driver=snap.driver,
            metadata={"pool_of": template.name, "golden_snapshot": str(snap.pk)},
        )
        op = operation_new(
            vm=vm, action="clone", actor=None, params={"snapshot": str(snap.pk), "golden": str(golden.pk), "pool": True}
        )
        operation_enqueue(op, vm)
    return vm


def _pool_vm_discard(vm: VM, why: str) -> bool:
    """Delete a pool VM nobody took (stale, broken or beyond the pool size)."""
    with transaction.atomic():
        try:
            previous = vm_transition_request(vm, "delete")
        except Exception:
            return False  # busy (e.g. being taken or still restoring): next pass
        op = operation_new(vm=vm, action="delete", actor=None, params={"previous_state": previous, "why": why})
        audit_record(actor=None, action="pool.discard", obj=vm, message=why)
        operation_enqueue(op, vm)
    return True


# Pool VMs restored at once per host: restores in parallel under TCG starve each other until
# their agents miss the identity deadline; the beat job fills the rest on its next passes.
POOL_FILLS_AT_ONCE = 2


def pool_refill(*, host: Host) -> dict[str, int]:
    """Beat job of ``host``: per template with a pool size, discard pool VMs that broke or
    belong to a replaced golden snapshot, trim pools above their size, and restore new ones
    from the golden snapshot until the size is reached or the host has no room left
    (``POOL_FILLS_AT_ONCE`` restores under way per host at most)."""
    with transaction.atomic():
        # One refill per host at a time: beat tasks of several worker processes may overlap,
        # and each would count the same free room and the same missing pool VMs.
        Host.objects.select_for_update().filter(pk=host.pk).values_list("pk", flat=True).first()
        return _pool_refill_locked(host)


def _pool_refill_locked(host: Host) -> dict[str, int]:
    counts = {"filled": 0, "discarded": 0, "no_room": 0}
    pooled = VM.objects.filter(purpose=VmPurpose.POOL, host=host)
    for vm in pooled.filter(state=S.ERROR):
        counts["discarded"] += _pool_vm_discard(vm, "broken")
    for template in Template.objects.filter(pool_size__gt=0).select_related("image"):
        golden = None
        if template.is_active:
            golden = golden_usable(
                template=template,
                host_id=host.pk,
                vcpus=template.vcpus,
                memory_mib=template.memory_mib,
                disk_gib=template.disk_gib,
            )
        current = str(golden.snapshot_id) if golden else None
        mine = pooled.filter(template=template).exclude(state__in=[S.ERROR, S.DELETING])
        for vm in mine:
            if vm.metadata.get("golden_snapshot") != current and vm.state == S.PAUSED:
                counts["discarded"] += _pool_vm_discard(vm, "its golden snapshot was replaced")
        mine = pooled.filter(template=template).exclude(state__in=[S.ERROR, S.DELETING])
        extra = mine.count() - template.pool_size
        for vm in mine.filter(state=S.PAUSED).order_by("-created_at")[: max(0, extra)]:
            counts["discarded"] += _pool_vm_discard(vm, "beyond the pool size")
        if golden is None:
            continue
        for _ in range(template.pool_size - mine.count()):
            if pooled.filter(state__in=[S.CREATING, S.STARTING]).count() >= POOL_FILLS_AT_ONCE:
                break
            if not pool_host_has_room(host, vcpus=template.vcpus, memory_mib=template.memory_mib):
                counts["no_room"] += 1
                logger.info("pool of %s not refilled: host %s has no room left", template.name, host.name)
                break
            _pool_fill_one(template, host, golden)
            counts["filled"] += 1
    return counts
