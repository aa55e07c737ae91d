"""Placement: which host a new VM goes to.

A host is a candidate when it is active, not cordoned, its heartbeat is recent (worker and
hostd, ``vms.selectors.host_is_up``) and its disk is above the reserve. While no host is up,
this machine's own host (``SANDBOX_HOST_NAME``) is the candidate: a fresh single-host install
creates VMs before its worker's first heartbeat, and admission measures this machine on the spot.

A VM goes only to a host whose driver boots its image (``Host.boot_modes``, reported by the
heartbeat, holds the image's ``boot_mode``; a host that has not reported yet is not filtered):
409 ``no_host`` saying so when none does.

Candidates are ranked by free room (memory first, then vCPUs, then disk): VMs spread over the
hosts with the most room. Among hosts equally roomy for this VM (each could take as many more
VMs of its size), one holding the template's golden snapshot comes first, then one holding a
verified copy of the image (``vms.inventory``): the others are not refused, the image is copied
to them when the VM boots there (``vms.distribution``). ``anti_affinity`` keeps the owner's VMs
apart: only hosts holding none of the owner's VMs are candidates. An operator may pin a host.

For a VM that boots now, the first candidate whose admission check passes is taken
(``vms.admission.host_admission_check``: the host row is locked until the create commits, so two
creates cannot both take the last room; a host that turned out full is released before the next
is tried, so a create holds at most one host lock and placement cannot deadlock). Lock order as
for admission: the owner's quota lock, then the host.
"""

from __future__ import annotations

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from accounts.permissions import require_perm
from sandbox_site.errors import ApplicationError, ConflictError
from vms.admission import host_admission_check, host_room_of, vm_claim_mib
from vms.hooks import hook_run
from vms.models import VM, Host, HostImage, Image, Template, VmState
from vms.selectors import host_is_up, hosts_with_load


def host_runs_image(host: Host, image: Image, *, driver: str = "") -> bool:
    """Whether ``host``'s driver boots ``image`` (its reported boot modes hold the image's; a
    host that has not reported them yet is assumed to) and, for an existing VM that ran under
    ``driver`` (its disk and firmware state are that driver's), whether the host runs that one."""
    if driver and host.driver and host.driver != driver:
        return False
    return not host.boot_modes or image.boot_mode in host.boot_modes


def host_candidates(
    *,
    owner=None,
    anti_affinity: bool = False,
    image: Image | None = None,
    template: Template | None = None,
    vcpus: int = 0,
    memory_mib: int = 0,
    driver: str = "",
    now=None,
) -> list[Host]:
    """The hosts a new VM may go to, best first; each carries ``room`` (``HostRoom``),
    ``holds_image`` and ``holds_golden``. ``image``: only hosts that boot it; ``template``
    and the VM's size: the locality preference among equally roomy hosts; ``driver``: only
    hosts running that driver (a VM that exists already, e.g. one a drain moves)."""
    now = now or timezone.now()
    Host.objects.get_or_create(name=settings.SANDBOX_HOST_NAME)  # as ``vms.services.local_host``
    hosts = hosts_with_load(Host.objects.filter(is_active=True, cordoned=False))
    if anti_affinity and owner is not None:
        owned = VM.objects.filter(owner=owner).exclude(state=VmState.DELETING).values("host_id")
        hosts = hosts.exclude(pk__in=owned)
    hosts = list(hosts)
    any_up = any(host_is_up(host, now) for host in Host.objects.filter(is_active=True))
    up = {host.pk for host in hosts if host_is_up(host, now)}
    holders: set = set()
    golden: set = set()
    if image is not None:
        holders = set(
            HostImage.objects.filter(
                image=image, status__in=[HostImage.Status.PRESENT, HostImage.Status.UNVERIFIED]
            ).values_list("host_id", flat=True)
        )
        if template is not None and template.image_id == image.pk:
            for found in hook_run("host_golden_holders", template=template):
                golden |= set(found or ())
    claim = vm_claim_mib(memory_mib) if memory_mib else 0
    ranked = []
    for host in hosts:
        # This machine's host without a heartbeat: only while no host is up (one host, fresh).
        if host.pk not in up and (any_up or host.name != settings.SANDBOX_HOST_NAME):
            continue
        if host.disk_free_gib is not None and host.disk_free_gib <= 0:
            continue
        if image is not None and not host_runs_image(host, image, driver=driver):
            continue
        host.room = host_room_of(host, vcpus=host.vcpus_used, memory_mib=host.memory_used_mib, vms=host.vms_holding)
        host.holds_image = host.pk in holders
        host.holds_golden = host.pk in golden
        # How many more VMs of this size the host could take: hosts taking as many are equally
        # roomy, and the one that already holds the golden snapshot or image goes first.
        fits = 0
        if claim and vcpus:
            fits = max(0, min(host.room.memory_free_mib // claim, host.room.vcpus_free // vcpus))
        ranked.append(
            (
                -fits,
                not host.holds_golden,
                not host.holds_image,
                -host.room.memory_free_mib,
                -host.room.vcpus_free,
                -(host.disk_free_gib or 0),
                host.name,
                host,
            )
        )
    ranked.sort(key=lambda row: row[:7])
    return [row[7] for row in ranked]


def host_boot_refusal(image: Image, hosts: list[Host], *, driver: str = "") -> ConflictError:
    """The 409 ``no_host`` for a VM of ``image`` (that ran under ``driver``) none of ``hosts`` runs."""
    drivers = {host.name: host.driver or "unknown" for host in hosts}
    listed = ", ".join(f"{n} ({d})" for n, d in drivers.items())
    if driver:
        return ConflictError(
            f"No host can run this VM: it needs the {driver} driver and {image.boot_mode} boot; hosts: {listed}.",
            code="no_host",
            details={"driver": driver, "boot_mode": image.boot_mode, "hosts": drivers},
        )
    return ConflictError(
        f"No host can boot image {image.name}: it needs {image.boot_mode} boot, which the driver of none of "
        f"{listed} offers (UEFI needs QEMU with OVMF, or cloud-hypervisor with SANDBOX_CLOUD_HYPERVISOR_FIRMWARE).",
        code="no_host",
        details={"boot_mode": image.boot_mode, "hosts": drivers},
    )


def vm_place(
    *,
    owner,
    vcpus: int,
    memory_mib: int,
    start: bool,
    pin: Host | None = None,
    anti_affinity: bool = False,
    image: Image | None = None,
    template: Template | None = None,
    driver: str = "",
) -> Host:
    """Inside the create's transaction, after the owner's quota lock: the host for a new VM of
    this size booting ``image`` (default: the template's; ``driver``: an existing VM's). 409
    ``host_full`` when it fits on no candidate, ``no_host`` when there is none (none up, none
    whose driver boots the image)."""
    image = image or (template.image if template is not None else None)
    if pin is not None:
        if not pin.is_active or pin.cordoned:
            raise ConflictError(
                f"Host {pin.name} takes no new VMs ({'cordoned' if pin.cordoned else 'removed'}).",
                code="no_host",
                details={"host": pin.name},
            )
        if image is not None and not host_runs_image(pin, image, driver=driver):
            raise host_boot_refusal(image, [pin], driver=driver)
        if start:
            host_admission_check(host=pin, vcpus=vcpus, memory_mib=memory_mib)
        return pin
    candidates = host_candidates(
        owner=owner,
        anti_affinity=anti_affinity,
        image=image,
        template=template,
        vcpus=vcpus,
        memory_mib=memory_mib,
        driver=driver,
    )
    if not candidates:
        if image is not None:
            others = host_candidates(owner=owner, anti_affinity=anti_affinity)
            if others:
                raise host_boot_refusal(image, others, driver=driver)
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
