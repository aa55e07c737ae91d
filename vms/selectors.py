"""Reads about VMs, templates and operations."""

from __future__ import annotations

from django.conf import settings
from django.db.models import Q, Sum

from accounts.models import UserQuota
from accounts.permissions import visible_queryset
from accounts.roles import user_is_operator
from vms.models import VM, Operation, Template, VmState


def vm_list_visible(user):
    return visible_queryset(user, VM.objects.select_related("owner", "template", "host"), "view")


def operation_list_visible(user):
    qs = Operation.objects.select_related("requested_by")
    if user_is_operator(user):
        return qs
    vm_ids = vm_list_visible(user).values("pk")
    return qs.filter(Q(vm_id__in=vm_ids) | Q(requested_by=user) | Q(vm_owner_id=user.pk))


def template_list_active():
    return Template.objects.filter(is_active=True).select_related("image")


def quota_for(user) -> dict[str, int]:
    row = UserQuota.objects.filter(user=user).first()
    if row is None:
        return dict(settings.SANDBOX_DEFAULT_QUOTA)
    return {f: getattr(row, f) for f in ("max_vms", "max_vcpus", "max_memory_mib", "max_disk_gib")}


def usage_of(user, *, exclude_vm_id=None) -> dict[str, int]:
    qs = VM.objects.filter(owner=user).exclude(state=VmState.DELETING)
    if exclude_vm_id is not None:
        qs = qs.exclude(pk=exclude_vm_id)
    agg = qs.aggregate(vcpus=Sum("vcpus"), memory_mib=Sum("memory_mib"), disk_gib=Sum("disk_gib"))
    return {
        "vms": qs.count(),
        "vcpus": agg["vcpus"] or 0,
        "memory_mib": agg["memory_mib"] or 0,
        # Snapshot storage counts against the same disk limit (snapshots app).
        "disk_gib": (agg["disk_gib"] or 0) + _snapshot_storage_gib(user),
    }


def _snapshot_storage_gib(user) -> int:
    from snapshots.selectors import snapshot_storage_gib

    return snapshot_storage_gib(user)


def vm_samples_rates(*, vm, minutes: int) -> list[dict]:
    from datetime import timedelta

    from django.utils import timezone

    from vms.models import ResourceSample
    from vms.sampling import samples_as_rates

    since = timezone.now() - timedelta(minutes=minutes)
    samples = list(ResourceSample.objects.filter(vm=vm, taken_at__gte=since).order_by("taken_at")[:5000])
    return samples_as_rates(samples)
