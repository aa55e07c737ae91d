"""Reads about snapshots. Access to a snapshot follows its VM: ``view`` on the VM shows its
snapshots, ``snapshot`` on the VM allows taking, restoring, cloning and deleting them. Once
the VM is deleted, the snapshot's owner (in their personal project), the members of its
project by their role, and operators keep access."""

from __future__ import annotations

import math
import uuid

from django.db.models import Prefetch, Q, Sum

from accounts.permissions import token_scope_filter, visible_queryset
from accounts.roles import user_is_operator
from accounts.selectors import project_ids_with
from accounts.services import object_in_token_scope, project_grants, user_has_perm
from snapshots.models import RetentionPolicy, Snapshot, VmLineage
from vms.models import VM

GIB = 1 << 30


def snapshot_list_visible(user):
    qs = Snapshot.objects.select_related("owner", "project", "vm", "parent", "host").prefetch_related(
        Prefetch("children", queryset=Snapshot.objects.only("pk", "parent_id"))
    )
    qs = token_scope_filter(qs)
    if user_is_operator(user):
        return qs
    vm_ids = visible_queryset(user, VM.objects.all(), "view").values("pk")
    return qs.filter(
        Q(vm_id__in=vm_ids)
        | Q(owner=user, project__personal_of=user)
        | Q(project_id__in=project_ids_with(user, "vms.view_vm"))
    )


def snapshot_user_can(user, perm: str, snapshot: Snapshot) -> bool:
    """``perm`` is ``view`` or ``snapshot`` (the VM permission that governs snapshots)."""
    if snapshot.vm_id is not None:
        return user_has_perm(user, f"vms.{perm}_vm", snapshot.vm)
    if not object_in_token_scope(snapshot):
        return False
    # Its owner keeps it in their personal project; in a team project the project role decides.
    mine = snapshot.owner_id == getattr(user, "pk", None) and snapshot.project.personal_of_id == snapshot.owner_id
    return mine or user_has_perm(user, f"vms.{perm}_vm") or project_grants(user, f"vms.{perm}_vm", snapshot.project_id)


def snapshot_storage_bytes(owner, *, exclude_deleting: bool = True, project=None) -> int:
    """Snapshot storage of ``owner`` (or, with ``owner=None``, of ``project``)."""
    qs = Snapshot.objects.filter(owner=owner) if owner is not None else Snapshot.objects.filter(project=project)
    if exclude_deleting:
        qs = qs.exclude(state=Snapshot.State.DELETING)
    done = qs.exclude(state=Snapshot.State.CREATING).aggregate(total=Sum("size_bytes"))["total"] or 0
    # A snapshot being taken has no size yet: it holds what its memory image will take, so
    # parallel snapshot requests cannot all count the same free room.
    taking = qs.filter(state=Snapshot.State.CREATING, include_memory=True).aggregate(mib=Sum("memory_mib"))["mib"]
    return done + ((taking or 0) << 20)


def snapshot_storage_gib(owner) -> int:
    """Snapshot storage of ``owner`` in whole GiB (rounded up): counted with VM disks in the
    owner's ``max_disk_gib`` limit."""
    return math.ceil(snapshot_storage_bytes(owner) / GIB)


def snapshot_storage_gib_of_project(project) -> int:
    """Snapshot storage of ``project`` in whole GiB (rounded up): counted with its VM disks."""
    return math.ceil(snapshot_storage_bytes(None, project=project) / GIB)


def snapshot_chain(snapshot: Snapshot) -> list[Snapshot]:
    """The snapshot and its ancestors whose disk layers it is built on, nearest first."""
    chain = [snapshot]
    seen = {snapshot.pk}
    current = snapshot
    while current.parent_id is not None and current.shared_layer:
        current = Snapshot.objects.get(pk=current.parent_id)
        if current.pk in seen:
            break
        seen.add(current.pk)
        chain.append(current)
    return chain


def snapshot_dependents(snapshot: Snapshot) -> dict[str, list[str]]:
    """What still reads this snapshot's disk layer: child snapshots and VMs whose disk
    sits on it. Empty lists when nothing does (or the layer is not shared)."""
    if not snapshot.shared_layer:
        return {"snapshots": [], "vms": []}
    # A child being deleted still reads this layer until its own merge has finished.
    children = list(snapshot.children.exclude(state=Snapshot.State.FAILED).values_list("name", flat=True))
    vms = list(VmLineage.objects.filter(snapshot=snapshot).values_list("vm__name", flat=True))
    return {"snapshots": children, "vms": vms}


def vm_lineage_snapshot(vm) -> Snapshot | None:
    row = VmLineage.objects.filter(vm=vm).select_related("snapshot").first()
    return row.snapshot if row else None


def retention_policy_for(vm) -> RetentionPolicy | None:
    """The policy that applies to ``vm``: its own, else its owner's."""
    return RetentionPolicy.objects.filter(vm=vm).first() or RetentionPolicy.objects.filter(user_id=vm.owner_id).first()


def is_uuid(value) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True
