"""Placement: which host a new VM goes to.

A host is a candidate when it is active, not cordoned, its heartbeat is recent (worker and
hostd, ``vms.selectors.host_is_up``) and its disk is above the reserve. While no host is up,
this machine's own host (``SANDBOX_HOST_NAME``) is the candidate: a fresh single-host install
creates VMs before its worker's first heartbeat, and admission measures this machine on the spot.

Candidates are ranked by free room (memory first, then vCPUs, then disk): VMs spread over the
hosts with the most room. ``anti_affinity`` keeps the owner's VMs apart: only hosts holding
none of the owner's VMs are candidates. An operator may pin a host.

For a VM that boots now, the first candidate whose admission check passes is taken
(``vms.admission.host_admission_check``: the host row is locked until the create commits, so two
creates cannot both take the last room; a host that turned out full is released before the next
is tried, so a create holds at most one host lock and placement cannot deadlock). Lock order as
for admission: the owner's quota lock, then the host.
"""

from __future__ import annotations

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Q, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from accounts.permissions import require_perm
from sandbox_site.errors import ApplicationError, ConflictError
from vms.admission import host_admission_check, host_room_of, vm_claim_mib
from vms.models import VM, Host, VmState
from vms.selectors import HOST_LOAD_STATES, host_is_up


def host_candidates(*, owner=None, anti_affinity: bool = False, now=None) -> list[Host]:
    """The hosts a new VM may go to, best first; each carries ``room`` (``HostRoom``)."""
    now = now or timezone.now()
    Host.objects.get_or_create(name=settings.SANDBOX_HOST_NAME)  # as ``vms.services.local_host``
    loaded = Q(vms__state__in=HOST_LOAD_STATES)
    hosts = Host.objects.filter(is_active=True, cordoned=False).annotate(
        vcpus_used=Coalesce(Sum("vms__vcpus", filter=loaded), 0),
        memory_used_mib=Coalesce(Sum("vms__memory_mib", filter=loaded), 0),
        vms_holding=Count("vms", filter=loaded),
    )
    if anti_affinity and owner is not None:
        owned = VM.objects.filter(owner=owner).exclude(state=VmState.DELETING).values("host_id")
        hosts = hosts.exclude(pk__in=owned)
    hosts = list(hosts)
    any_up = any(host_is_up(host, now) for host in Host.objects.filter(is_active=True))
    up = {host.pk for host in hosts if host_is_up(host, now)}
    ranked = []
    for host in hosts:
        # This machine's host without a heartbeat: only while no host is up (one host, fresh).
        if host.pk not in up and (any_up or host.name != settings.SANDBOX_HOST_NAME):
            continue
        if host.disk_free_gib is not None and host.disk_free_gib <= 0:
            continue
        host.room = host_room_of(host, vcpus=host.vcpus_used, memory_mib=host.memory_used_mib, vms=host.vms_holding)
        ranked.append((-host.room.memory_free_mib, -host.room.vcpus_free, -(host.disk_free_gib or 0), host.name, host))
    ranked.sort(key=lambda row: row[:4])
    return [row[4] for row in ranked]


def vm_place(
    *,
    owner,
    vcpus: int,
    memory_mib: int,
    start: bool,
    pin: Host | None = None,
    anti_affinity: bool = False,
) -> Host:
    """Inside the create's transaction, after the owner's quota lock: the host for a new VM of
    this size. 409 ``host_full`` when it fits on no candidate, ``no_host`` when there is none."""
    if pin is not None:
        if not pin.is_active or pin.cordoned:
            raise ConflictError(
                f"Host {pin.name} takes no new VMs ({'cordoned' if pin.cordoned else 'removed'}).",
                code="no_host",
                details={"host": pin.name},
            )
        if start:
            host_admission_check(host=pin, vcpus=vcpus, memory_mib=memory_mib)
        return pin
    candidates = host_candidates(owner=owner, anti_affinity=anti_affinity)
    if not candidates:
        reason = "none is up, uncordoned and above its disk reserve"
        if anti_affinity:
            reason += " (and without your other VMs, as anti_affinity asks)"
        raise ConflictError(f"No host can take a new VM: {reason}.", code="no_host")
    if not start:
        return candidates[0]
    # Hosts without the room now are not even tried (their row is not locked); the first that
    # passes the admission check under its lock wins.
    claim = vm_claim_mib(memory_mib)
    fitting = [h for h in candidates if h.room.vcpus_free >= vcpus and h.room.memory_free_mib >= claim]
    refusals: dict[str, dict] = {}
    for host in fitting or candidates[:1]:
        try:
            with transaction.atomic():  # a savepoint: a full host's lock is released
                host_admission_check(host=host, vcpus=vcpus, memory_mib=memory_mib)
        except ConflictError as exc:
            if len(candidates) == 1:
                raise
            refusals[host.name] = exc.details
            continue
        return host
    for host in candidates:
        refusals.setdefault(
            host.name,
            {"vcpus_free": host.room.vcpus_free, "memory_free_mib": host.room.memory_free_mib},
        )
    raise ConflictError(
        f"No host has room for this VM now ({len(candidates)} tried); stop another VM or ask an operator.",
        code="host_full",
        details={"hosts": refusals},
    )


def host_pin_resolve(*, name: str | None, actor) -> Host | None:
    """The host an operator pinned a create to (``host`` by name), or None. Users may not pin."""
    if not name:
        return None
    require_perm(actor, "vms.change_host", None, action="vm.create", message="Only operators may pick the host.")
    host = Host.objects.filter(name=name).first()
    if host is None:
        raise ApplicationError(f"There is no host named {name!r}.", details={"host": "unknown"})
    return host
