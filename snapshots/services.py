"""Snapshots: the business rules. Views, tasks and the worker call these.

- ``snapshot_create``: records the snapshot (creating) and a ``snapshot`` operation on the
  VM's host queue; the worker pauses the VM only to save its state and freeze its disk.
- ``snapshot_create``: the VM goes ``snapshotting`` (compare-and-set through
  ``vms.transitions``) until the worker is done; stop, delete and other actions are refused
  (409) meanwhile, API writes that do not change the state (name, metadata) are not blocked.
- ``snapshot_restore``: the VM goes ``starting`` (compare-and-set through ``vms.transitions``);
  the worker verifies every file of the snapshot chain first and, if one is bad, puts the
  VM back in the state it was in without touching it.
- ``snapshot_clone``: N new VMs (``creating``) owned by the actor, each with a ``clone``
  operation; they share the snapshot's disk layer copy-on-write and get their own identity.
- ``snapshot_delete``: refused while other layers or VMs sit on the snapshot's disk layer,
  except when the layer can be merged into its only dependent safely (nothing running on it).
- ``retention_*``: policies per VM or per user; ``retention_apply`` runs from Celery beat.
"""

from __future__ import annotations

import logging
import math
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from accounts.audit import audit_record
from accounts.models import AuditResult
from accounts.permissions import require_perm
from accounts.selectors import PROJECT_WRITE_ROLES, project_role_of, quota_of_project
from accounts.services import project_for_create, user_has_perm
from sandbox_site.errors import ApplicationError, ConflictError, NotPermitted, QuotaExceeded
from snapshots import selectors
from snapshots.models import RetentionPolicy, Snapshot
from vms import hypervisor
from vms import selectors as vm_selectors
from vms import services as vm_services
from vms.host_disk import require_disk_space
from vms.models import VM, VmState
from vms.operations import operation_enqueue, operation_new
from vms.transitions import TRANSITIONS, vm_transition_request

logger = logging.getLogger(__name__)

S = VmState
GIB = 1 << 30


def snapshot_root() -> Path:
    return Path(settings.SANDBOX_SNAPSHOT_DIR)


def _snapshot_audit(snapshot: Snapshot) -> dict:
    return {
        "name": snapshot.name,
        "vm": str(snapshot.vm_ref),
        "include_memory": snapshot.include_memory,
        "state": snapshot.state,
        "size_bytes": snapshot.size_bytes,
        "parent": str(snapshot.parent_id) if snapshot.parent_id else None,
    }


def _require_vm_perm(actor, vm: VM, action: str) -> None:
    require_perm(actor, "vms.snapshot_vm", vm, action=f"snapshot.{action}")


def _require_snapshot_perm(actor, snapshot: Snapshot, action: str) -> None:
    allowed = selectors.snapshot_user_can(actor, "snapshot", snapshot)
    require_perm(actor, "vms.snapshot_vm", snapshot, action=f"snapshot.{action}", allowed=allowed)


def _check_storage(owner, *, extra_bytes: int, project=None) -> None:
    """Snapshot storage counts with VM disks against the owner's ``max_disk_gib`` and the
    project's (called under ``vm_services.quota_locks(project, owner)``)."""
    asked = math.ceil(extra_bytes / GIB)
    budgets = [("your", vm_selectors.quota_for(owner), vm_selectors.usage_of(owner))]
    if project is not None:
        budgets.append(("the project's", quota_of_project(project), vm_selectors.usage_of_project(project)))
    for whose, quota, usage in budgets:  # usage: VM disks + snapshot storage already taken
        if usage["disk_gib"] + asked > quota["max_disk_gib"]:
            raise QuotaExceeded(
                f"This snapshot would exceed {whose} disk limit (VM disks and snapshots count together).",
                details={
                    "disk_gib": f"{usage['disk_gib']} used + ~{asked} for the snapshot > limit {quota['max_disk_gib']}"
                },
            )


def snapshot_create(*, vm: VM, actor, name: str, description: str = "", include_memory: bool = True):
    """Record a snapshot of ``vm`` and enqueue the operation that takes it. Returns
    ``(snapshot, operation)``."""
    _require_vm_perm(actor, vm, "create")
    require_disk_space(action="take a snapshot")
    name = (name or "").strip()
    if not name or len(name) > 100:
        raise ApplicationError("Give the snapshot a name of 1 to 100 characters.", details={"name": "required"})
    rule = TRANSITIONS["snapshot"]
    with transaction.atomic():
        vm_services.quota_locks(vm.project, vm.owner)  # snapshot count and storage are checked under them
        locked = VM.objects.select_related("host").get(pk=vm.pk)
        busy = Snapshot.objects.filter(vm=locked, state=Snapshot.State.CREATING).exists()
        if busy or locked.state == S.SNAPSHOTTING:
            raise ConflictError("A snapshot of this VM is already being taken.", code="snapshot_in_progress")
        if locked.state not in rule.allowed_from:
            raise ConflictError(
                f"Cannot snapshot a VM that is {locked.state}.",
                details={"state": locked.state, "allowed_from": sorted(rule.allowed_from)},
            )
        if include_memory and locked.state == S.STOPPED:
            raise ConflictError(
                "A stopped VM has no memory to save: start it, or take a disk-only snapshot (include_memory=false).",
                code="vm_stopped",
            )
        if not include_memory and not hypervisor.driver_capabilities(locked.driver).disk_only_snapshot:
            raise ApplicationError(
                f"{locked.driver or 'This driver'} snapshots always include memory.",
                details={"include_memory": "required"},
            )
        count = Snapshot.objects.filter(vm=locked).exclude(state=Snapshot.State.DELETING).count()
        if count >= settings.SANDBOX_SNAPSHOTS_PER_VM:
            raise QuotaExceeded(
                f"A VM may have at most {settings.SANDBOX_SNAPSHOTS_PER_VM} snapshots; delete some first.",
                details={"snapshots": count},
            )
        if Snapshot.objects.filter(vm_ref=locked.pk, name=name).exists():
            raise ConflictError(f"This VM already has a snapshot named {name!r}.", details={"name": "taken"})
        _check_storage(
            locked.owner, project=locked.project, extra_bytes=(locked.memory_mib << 20) if include_memory else 0
        )
        snapshot = snapshot_row_new(
            vm=locked, name=name, description=(description or "")[:1000], include_memory=include_memory
        )
        # Last: the compare-and-set holds the VM's row until commit, and a concurrent request
        # that changed the state since the checks above makes this one lose (409).
        previous = vm_transition_request(
            locked, "snapshot", allowed=rule.allowed_from - {S.STOPPED} if include_memory else None
        )
        op = operation_new(
            vm=locked, action="snapshot", actor=actor, params={"snapshot": str(snapshot.pk), "previous_state": previous}
        )
        audit_record(
            actor=actor,
            action="snapshot.create",
            obj=snapshot,
            after={**_snapshot_audit(snapshot), "operation": str(op.pk)},
        )
        operation_enqueue(op, locked)
    return snapshot, op


def snapshot_row_new(*, vm: VM, name: str, include_memory: bool, description: str = "") -> Snapshot:
    """In the caller's transaction: the ``pending`` row of a snapshot of ``vm`` at its current
    size, with its directory under the snapshot root (taken by ``snapshot_take``)."""
    snapshot = Snapshot.objects.create(
        vm=vm,
        vm_ref=vm.pk,
        vm_name=vm.name,
        owner=vm.owner,
        project_id=vm.project_id,
        host=vm.host or vm_services.local_host(),
        template=vm.template,
        image=vm.image,
        name=name,
        description=description,
        include_memory=include_memory,
        driver=vm.driver,
        vcpus=vm.vcpus,
        memory_mib=vm.memory_mib,
        disk_gib=vm.disk_gib,
    )
    snapshot.directory = str(snapshot_root() / str(snapshot.pk))
    snapshot.save(update_fields=["directory"])
    return snapshot


def _require_ready(snapshot: Snapshot) -> None:
    if snapshot.state != Snapshot.State.READY:
        raise ConflictError(f"The snapshot is {snapshot.state}; only a ready snapshot can be used.")


def snapshot_restore(*, snapshot: Snapshot, actor):
    """Put the snapshot's VM back to the snapshot: enqueue a ``restore`` operation."""
    _require_snapshot_perm(actor, snapshot, "restore")
    _require_ready(snapshot)
    if snapshot.vm_id is None:
        raise ConflictError("The VM of this snapshot was deleted; clone the snapshot into a new VM instead.")
    with transaction.atomic():
        vm = VM.objects.select_related("host").get(pk=snapshot.vm_id)
        if vm.host_id != snapshot.host_id:
            raise ConflictError("The VM moved to another host than the one holding this snapshot.")
        vm_services.host_admission_check(host=vm.host, vcpus=snapshot.vcpus, memory_mib=snapshot.memory_mib, vm=vm)
        before = vm_transition_request(vm, "restore")
        op = operation_new(
            vm=vm, action="restore", actor=actor, params={"snapshot": str(snapshot.pk), "previous_state": before}
        )
        audit_record(
            actor=actor,
            action="snapshot.restore",
            obj=snapshot,
            before={"vm_state": before},
            after={"operation": str(op.pk), "vm": str(vm.pk)},
        )
        operation_enqueue(op, vm)
    return op


def snapshot_clone(*, snapshot: Snapshot, actor, count: int = 1, name_prefix: str = "", project=None):
    """Create ``count`` VMs owned by ``actor`` from the snapshot; returns ``[(vm, op), ...]``.
    They go into ``project``; by default the snapshot's project when the actor may create
    there, else where ``accounts.services.project_for_create`` puts them."""
    from vms.models import name_validator

    _require_snapshot_perm(actor, snapshot, "clone")
    require_disk_space(action="clone a snapshot")
    _require_ready(snapshot)
    require_perm(actor, "vms.add_vm", None, action="snapshot.clone", message="Your role may not create VMs.")
    if not 1 <= count <= settings.SANDBOX_CLONE_MAX:
        raise ApplicationError(f"count must be between 1 and {settings.SANDBOX_CLONE_MAX}.", details={"count": count})
    prefix = (name_prefix or f"{snapshot.vm_name}-clone")[:55]
    names = [f"{prefix}-{i}" for i in range(1, count + 1)]
    for name in names:
        try:
            name_validator(name)
        except Exception as exc:
            raise ApplicationError(f"{name!r} is not a valid VM name.", details={"name_prefix": str(exc)}) from exc
    if project is None and project_role_of(actor, snapshot.project_id) in PROJECT_WRITE_ROLES:
        project = snapshot.project
    project = project_for_create(actor=actor, owner=actor, project=project, action="snapshot.clone")
    created = []
    with transaction.atomic():
        vm_services.quota_locks(project, actor)  # clones count against the cloner's and project's quota
        taken = set(VM.objects.filter(owner=actor, name__in=names).values_list("name", flat=True))
        if taken:
            raise ConflictError(f"You already have VMs named {sorted(taken)}.", details={"name_prefix": "taken"})
        # All clones at once: each starts on the snapshot's host.
        vm_services.host_admission_check(
            host=snapshot.host, vcpus=snapshot.vcpus, memory_mib=snapshot.memory_mib, count=count
        )
        _vm_not_moving(snapshot)
        for name in names:
            vm_services.vm_limits_check(
                owner=actor,
                project=project,
                template=snapshot.template,
                vcpus=snapshot.vcpus,
                memory_mib=snapshot.memory_mib,
                disk_gib=snapshot.disk_gib,
            )
            vm = VM(
                name=name,
                owner=actor,
                project=project,
                template=snapshot.template,
                image=snapshot.image,
                host=snapshot.host,
                vcpus=snapshot.vcpus,
                memory_mib=snapshot.memory_mib,
                disk_gib=snapshot.disk_gib,
                driver=snapshot.driver,
                metadata={"cloned_from": str(snapshot.pk)},
            )
            vm.full_clean()
            vm.save()
            vm_services.vm_row_init(vm=vm, actor=actor)  # permissions; its own MAC and address
            op = operation_new(vm=vm, action="clone", actor=actor, params={"snapshot": str(snapshot.pk)})
            audit_record(
                actor=actor,
                action="vm.create",
                obj=vm,
                after={"name": name, "cloned_from": str(snapshot.pk), "operation": str(op.pk)},
            )
            operation_enqueue(op, vm)
            created.append((vm, op))
        audit_record(
            actor=actor,
            action="snapshot.clone",
            obj=snapshot,
            after={"count": count, "vms": [str(vm.pk) for vm, _ in created]},
        )
    return created


def _vm_not_moving(snapshot: Snapshot) -> None:
    """Inside the caller's transaction: lock the snapshot's VM row and refuse (409 ``vm_moving``)
    while that VM moves to another host (its snapshots' files are being copied and then
    deleted here: ``vms.moves``)."""
    if snapshot.vm_id is None:
        return
    state = VM.objects.select_for_update().filter(pk=snapshot.vm_id).values_list("state", flat=True).first()
    if state == VmState.MOVING:
        raise ConflictError(
            f"The VM of snapshot {snapshot.name!r} is moving to another host; try again when it has landed.",
            code="vm_moving",
        )


def snapshot_delete(*, snapshot: Snapshot, actor, reason: str = "") -> Snapshot:
    """Delete a snapshot whose disk layer nothing depends on (files are removed on its host).
    When exactly one dependent sits on it and nothing runs on that chain, the layer is
    merged into the dependent instead (the worker does it); otherwise 409 names them."""
    if actor is not None:
        _require_snapshot_perm(actor, snapshot, "delete")
    with transaction.atomic():
        locked = _lock_neighbours(snapshot)
        if locked.state in (Snapshot.State.CREATING, Snapshot.State.DELETING):
            raise ConflictError(f"The snapshot is {locked.state}.")
        _vm_not_moving(locked)
        if locked.parent_id and locked.parent.state == Snapshot.State.DELETING:
            raise ConflictError(
                f"The parent of snapshot {locked.name!r} is being deleted (its layer is merging into this one); "
                "try again when that has finished.",
                code="snapshot_busy",
            )
        deps = selectors.snapshot_dependents(locked)
        merge_into = None
        if deps["snapshots"] or deps["vms"]:
            if locked.children.filter(state=Snapshot.State.DELETING).exists():
                # Its layer would be merged into a layer that is going away.
                raise ConflictError(
                    f"A snapshot built on {locked.name!r} is being deleted; try again when that has finished.",
                    code="snapshot_busy",
                )
            merge_into = snapshot_merge_target(locked, deps)
            if merge_into is None:
                raise ConflictError(_dependents_message(locked, deps), code="snapshot_in_use", details=deps)
        before = _snapshot_audit(locked)
        locked.state = Snapshot.State.DELETING
        locked.save(update_fields=["state"])
        audit_record(
            actor=actor,
            action="snapshot.delete",
            obj=locked,
            before=before,
            after={"merge_into": merge_into, "reason": reason} if merge_into or reason else None,
        )
        from snapshots.tasks import snapshot_delete_task

        queue = locked.host.queue
        transaction.on_commit(lambda: snapshot_delete_task.apply_async(args=[str(locked.pk)], queue=queue))
    return locked


def _lock_neighbours(snapshot: Snapshot) -> Snapshot:
    """Lock ``snapshot``, its parent and its children (in id order, so two deletes never
    deadlock): deletes of neighbours in one chain, which merge layers into each other, run one
    after the other and the second sees the first's ``deleting``. Returns the locked row."""
    ids = {snapshot.pk, *Snapshot.objects.filter(parent_id=snapshot.pk).values_list("pk", flat=True)}
    parent_id = Snapshot.objects.filter(pk=snapshot.pk).values_list("parent_id", flat=True).first()
    if parent_id:
        ids.add(parent_id)
    rows = {row.pk: row for row in Snapshot.objects.select_for_update().filter(pk__in=ids).order_by("pk")}
    if snapshot.pk not in rows:
        raise Snapshot.DoesNotExist()
    return rows[snapshot.pk]


def _dependents_message(snapshot: Snapshot, deps: dict[str, list[str]]) -> str:
    parts = []
    if deps["snapshots"]:
        parts.append("snapshots " + ", ".join(repr(n) for n in deps["snapshots"]))
    if deps["vms"]:
        parts.append("VMs " + ", ".join(repr(n) for n in deps["vms"]))
    return (
        f"Snapshot {snapshot.name!r} cannot be deleted: the disks of {' and '.join(parts)} are built on it. "
        "Delete those snapshots first, or stop the VM so the layer can be merged into it."
    )


def snapshot_merge_target(snapshot: Snapshot, deps: dict[str, list[str]]) -> str | None:
    """The one dependent this layer can be merged into safely: a single child snapshot or a
    single VM, with no VM running on anything built on that dependent (a running QEMU keeps
    its backing files open and cached, so they must not be rewritten under it)."""
    from snapshots.models import VmLineage

    if len(deps["snapshots"]) + len(deps["vms"]) != 1:
        return None
    if deps["vms"]:
        row = VmLineage.objects.select_related("vm").get(snapshot=snapshot)
        return f"vm:{row.vm_id}" if row.vm.state in (S.STOPPED, S.ERROR) else None
    child = snapshot.children.exclude(state=Snapshot.State.FAILED).get()
    if child.state != Snapshot.State.READY or not _layer_idle(child):
        return None
    return f"snapshot:{child.pk}"


def _layer_idle(snapshot: Snapshot) -> bool:
    """No VM that is not stopped has this snapshot's layer in its disk chain."""
    from snapshots.models import VmLineage

    pending = [snapshot]
    seen = set()
    while pending:
        current = pending.pop()
        if current.pk in seen:
            continue
        seen.add(current.pk)
        busy = VmLineage.objects.filter(snapshot=current).exclude(vm__state__in=[S.STOPPED, S.ERROR]).exists()
        if busy:
            return False
        pending.extend(current.children.exclude(state=Snapshot.State.FAILED))
    return True


# --- retention ---------------------------------------------------------------------------


def retention_policy_set(*, actor, vm: VM | None = None, user=None, keep_last: int | None, keep_days: int | None):
    """Set (or with both values None, remove) the retention policy of a VM or of a user."""
    if (vm is None) == (user is None):
        raise ApplicationError("Give exactly one of vm or user.")
    if vm is not None:
        _require_vm_perm(actor, vm, "retention")
    elif user.pk != actor.pk and not user_has_perm(actor, "accounts.change_userquota"):
        raise NotPermitted("You may only set your own retention policy.")
    for key, value in (("keep_last", keep_last), ("keep_days", keep_days)):
        if value is not None and not 0 <= int(value) <= 100000:
            raise ApplicationError(f"{key} must be between 0 and 100000.", details={key: value})
    target = {"vm": vm} if vm is not None else {"user": user}
    with transaction.atomic():
        row = RetentionPolicy.objects.select_for_update().filter(**target).first()
        before = {"keep_last": row.keep_last, "keep_days": row.keep_days} if row else None
        if keep_last is None and keep_days is None:
            if row:
                row.delete()
            row = None
        else:
            row = row or RetentionPolicy(**target)
            row.keep_last, row.keep_days = keep_last, keep_days
            row.created_by = actor
            row.save()
        audit_record(
            actor=actor,
            action="snapshot.retention_set",
            obj=vm or user,
            before=before,
            after={"keep_last": keep_last, "keep_days": keep_days},
        )
    return row


def retention_expired(snapshots: list[Snapshot], policy: RetentionPolicy, now) -> list[Snapshot]:
    """Snapshots (of one VM, any order) the policy does not keep."""
    ordered = sorted(snapshots, key=lambda s: s.created_at, reverse=True)
    keep: set = set()
    if policy.keep_last is not None:
        keep.update(s.pk for s in ordered[: policy.keep_last])
    if policy.keep_days is not None:
        horizon = now - timedelta(days=policy.keep_days)
        keep.update(s.pk for s in ordered if s.created_at >= horizon)
    return [s for s in ordered if s.pk not in keep]


def retention_apply(*, host=None, now=None) -> dict[str, int]:
    """Delete the snapshots retention policies do not keep (oldest first, so layers merge
    towards the newest), per VM. Snapshots in use are kept and the reason audited."""
    now = now or timezone.now()
    counts = {"deleted": 0, "kept_in_use": 0}
    qs = Snapshot.objects.filter(state=Snapshot.State.READY, vm__isnull=False)
    if host is not None:
        qs = qs.filter(host=host)
    for vm_id in qs.values_list("vm_id", flat=True).distinct():
        vm = VM.objects.filter(pk=vm_id).first()
        if vm is None:
            continue
        policy = selectors.retention_policy_for(vm)
        if policy is None:
            continue
        snaps = list(Snapshot.objects.filter(vm=vm, state=Snapshot.State.READY))
        for snap in sorted(retention_expired(snaps, policy, now), key=lambda s: s.created_at):
            try:
                snapshot_delete(
                    snapshot=snap, actor=None, reason=f"retention (last {policy.keep_last}, {policy.keep_days} days)"
                )
                counts["deleted"] += 1
            except ConflictError as exc:
                counts["kept_in_use"] += 1
                with transaction.atomic():
                    audit_record(
                        actor=None,
                        action="snapshot.retention_kept",
                        obj=snap,
                        result=AuditResult.FAILED,
                        message=exc.message,
                    )
    return counts


# --- moving a VM to another host (vms.moves) -------------------------------------------------


def snapshots_migrate_check(*, vm: VM, target) -> None:
    """A VM with snapshots does not migrate live: their files stay on its host and only a cold
    move (``vms.moves``) copies them along."""
    names = list(Snapshot.objects.filter(vm=vm).exclude(state=Snapshot.State.FAILED).values_list("name", flat=True))
    if names:
        raise ConflictError(
            f"This VM has snapshots ({', '.join(names[:5])}); a live migration would leave them behind: "
            "move it cold (POST .../move/), which copies them.",
            code="migration_unsupported",
            details={"snapshots": names},
        )


def snapshots_move_check(*, vm: VM, target) -> None:
    """A VM moves with its snapshots: none may be half-taken or being deleted, and no other
    VM or snapshot may build on one of them (its layer would leave their host)."""
    from snapshots.models import VmLineage

    own = Snapshot.objects.filter(vm=vm)
    busy = list(own.filter(state__in=[Snapshot.State.CREATING, Snapshot.State.DELETING]).values_list("name", flat=True))
    if busy:
        raise ConflictError(
            f"Snapshots {', '.join(busy)} of this VM are being taken or deleted; move it afterwards.",
            code="snapshot_busy",
            details={"snapshots": busy},
        )
    vms = list(VmLineage.objects.filter(snapshot__vm=vm).exclude(vm=vm).values_list("vm__name", flat=True))
    children = list(
        Snapshot.objects.filter(parent__vm=vm)
        .exclude(vm=vm)
        .exclude(state=Snapshot.State.FAILED)
        .values_list("name", flat=True)
    )
    if vms or children:
        raise ConflictError(
            "Other VMs or snapshots are built on this VM's snapshots; it cannot leave their host.",
            code="snapshot_in_use",
            details={"vms": vms, "snapshots": children},
        )


def snapshots_move_files(*, vm: VM) -> list[Path]:
    """The files of ``vm``'s ready snapshots (their whole directories), on this host."""
    files: list[Path] = []
    for snapshot in Snapshot.objects.filter(vm=vm, state=Snapshot.State.READY).order_by("created_at"):
        directory = Path(snapshot.directory)
        if not directory.is_dir():
            raise ApplicationError(
                f"The files of snapshot {snapshot.name!r} are not on this host ({directory}).",
                code="snapshot_missing",
            )
        files.extend(sorted(p for p in directory.iterdir() if p.is_file() and not p.is_symlink()))
    return files


def snapshots_move_layers(*, vm: VM) -> list[str]:
    """The disk layers recorded for ``vm``: its own snapshots' and those of the snapshot its
    disk descends from (a clone's golden or source snapshot), each with the layers below it."""
    from snapshots.models import VmLineage

    layers: list[str] = []
    snapshots = list(Snapshot.objects.filter(vm=vm).exclude(state=Snapshot.State.FAILED))
    lineage = VmLineage.objects.filter(vm=vm).select_related("snapshot").first()
    if lineage is not None:
        snapshots.append(lineage.snapshot)
    for snapshot in snapshots:
        if snapshot.disk_layer:
            layers.append(snapshot.disk_layer)
        layers.extend(str(p) for p in (snapshot.backing_chain or []) if isinstance(p, str))
    return layers


def snapshots_host_changed(*, vm: VM, source, target) -> None:
    """In the transaction recording a moved VM on ``target``: its ready snapshots are there too."""
    Snapshot.objects.filter(vm=vm, host=source, state=Snapshot.State.READY).update(host=target)
