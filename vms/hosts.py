"""Host lifecycle an operator drives: cordon (placement puts no new VMs there; its VMs keep
running), uncordon, remove (an empty host leaves for good), and join (``manage.py host_join``:
register a host and issue the certificate its hostd's TLS listener presents). Every change is
audited. Also the fan-out of per-host periodic work to every host's queue."""

from __future__ import annotations

import datetime

from celery import current_app
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from accounts.audit import audit_record
from accounts.permissions import require_perm
from sandbox_site.errors import ApplicationError, ConflictError
from vms import pki
from vms.hooks import hook_run
from vms.hostd.tls import parse_listen
from vms.models import VM, Host


def host_cordon(*, host: Host, cordoned: bool, actor) -> Host:
    """Set ``host``'s cordon (idempotent: setting what is already set writes nothing)."""
    action = "host.cordon" if cordoned else "host.uncordon"
    require_perm(actor, "vms.change_host", host, action=action)
    with transaction.atomic():
        locked = Host.objects.select_for_update().get(pk=host.pk)
        if locked.cordoned == cordoned:
            return locked
        before = {"cordoned": locked.cordoned}
        locked.cordoned = cordoned
        locked.save(update_fields=["cordoned"])
        audit_record(actor=actor, action=action, obj=locked, before=before, after={"cordoned": cordoned})
    return locked


def host_remove(*, host: Host, actor) -> Host:
    """Take ``host`` out of the platform for good (inactive and cordoned: no placement, no
    heartbeat checks). Refused (409 ``host_busy``) while VMs are recorded on it: move or
    delete them first. The row stays, for the audit log and the VMs' history."""
    require_perm(actor, "vms.delete_host", host, action="host.remove")
    with transaction.atomic():
        locked = Host.objects.select_for_update().get(pk=host.pk)
        if not locked.is_active:
            return locked
        vms = VM.objects.filter(host=locked).count()
        if vms:
            raise ConflictError(
                f"Host {locked.name} still holds {vms} VM(s); move or delete them first.",
                code="host_busy",
                details={"vms": vms},
            )
        before = {"is_active": True, "cordoned": locked.cordoned}
        locked.is_active, locked.cordoned = False, True
        locked.save(update_fields=["is_active", "cordoned"])
        audit_record(
            actor=actor, action="host.remove", obj=locked, before=before, after={"is_active": False, "cordoned": True}
        )
    return locked


def host_join(*, name: str, address: str, tunnel_address: str = "", actor=None) -> tuple[Host, pki.CertFiles]:
    """Register hypervisor host ``name`` whose hostd listens (mutual TLS) at ``address``
    (``host:port``) and issue its server certificate (a new one each time: joining again
    replaces a lost or leaked key). ``tunnel_address``: its underlay IPv4 address for the
    VXLAN tunnels of networks spanning hosts (empty: left as it is). Returns the host and
    the files to copy to it."""
    import ipaddress

    from django.core.validators import validate_slug

    try:
        validate_slug(name)
        address_host, _ = parse_listen(address)
        if tunnel_address:
            tunnel_address = str(ipaddress.IPv4Address(tunnel_address))
    except (ValidationError, ValueError) as exc:
        raise ApplicationError(
            "A host needs a slug name, an address host:port and, when given, an IPv4 tunnel address.",
            details={"name": name, "address": address, "tunnel_address": tunnel_address},
        ) from exc
    if len(name) > 63:
        raise ApplicationError("A host's name is at most 63 characters.", details={"name": "too long"})
    files = pki.host_cert_issue(name, address_host)
    pki.control_ensure()
    with transaction.atomic():
        host, created = Host.objects.select_for_update().get_or_create(name=name)
        before = (
            None
            if created
            else {
                "hostd_address": host.hostd_address,
                "is_active": host.is_active,
                "tunnel_address": host.tunnel_address,
            }
        )
        host.hostd_address, host.is_active = address, True
        tunnel_changed = bool(tunnel_address) and tunnel_address != host.tunnel_address
        host.tunnel_address = tunnel_address or host.tunnel_address
        host.save(update_fields=["hostd_address", "is_active", "tunnel_address"])
        audit_record(
            actor=actor,
            action="host.join",
            obj=host,
            before=before,
            after={"hostd_address": address, "is_active": True, "tunnel_address": host.tunnel_address},
        )
        if tunnel_changed:
            hook_run("host_tunnel_changed", host=host)
    return host, files


# Why a running VM cannot be live-migrated; drain cold-moves it instead (it restarts).
LIVE_MIGRATION_REFUSALS = frozenset({"migration_unsupported", "no_tunnel_address"})


def vm_mover(vm: VM):
    """How drain moves ``vm`` off its host: the one place that chooses. A running VM migrates
    live (``vms.migration.vm_migrate``: it keeps running) where its driver, boot mode and the
    target allow, else it is cold-moved (``vms.moves.vm_move``: stopped, moved, started
    again); a stopped VM is cold-moved."""
    from vms.models import VmState
    from vms.moves import vm_move

    if vm.state != VmState.RUNNING:
        return vm_move
    from vms.migration import vm_migrate

    def live_or_cold(*, vm: VM, host: Host, actor):
        try:
            return vm_migrate(vm=vm, host=host, actor=actor)
        except ConflictError as exc:
            if exc.code not in LIVE_MIGRATION_REFUSALS:
                raise
        return vm_move(vm=vm, host=host, actor=actor)

    return live_or_cold


def host_drain(*, host: Host, actor) -> dict:
    """Cordon ``host`` and move every VM off it, each to the host placement picks (as for a
    new VM of its size and owner; a running VM must pass admission there). A VM that fits
    nowhere, or cannot move now (not stopped or running, a system VM), stays, with the reason
    in the result's ``stays``. Audited ``host.drain``; each move is an operation (``moves``)."""
    from vms.models import VmPurpose, VmState
    from vms.placement import vm_place

    require_perm(actor, "vms.change_host", host, action="host.drain")
    host = host_cordon(host=host, cordoned=True, actor=actor)
    moves: list[dict] = []
    stays: list[dict] = []
    for vm in (
        VM.objects.filter(host=host).select_related("host", "owner", "template__image", "image").order_by("created_at")
    ):
        row = {"vm": str(vm.pk), "name": vm.name}
        if vm.purpose != VmPurpose.USER:
            stays.append({**row, "code": "system_vm", "reason": "a warm-pool or golden-snapshot VM: not moved"})
            continue
        if vm.state not in (VmState.RUNNING, VmState.STOPPED):
            stays.append({**row, "code": "state", "reason": f"the VM is {vm.state}; only stopped and running VMs move"})
            continue
        mover = vm_mover(vm)
        try:
            with transaction.atomic():
                target = vm_place(
                    owner=vm.owner,
                    vcpus=vm.vcpus,
                    memory_mib=vm.memory_mib,
                    start=vm.state == VmState.RUNNING,
                    image=vm.boot_image,
                    template=vm.template,
                    driver=vm.driver,
                )
                op = mover(vm=vm, host=target, actor=actor)
        except ApplicationError as exc:
            stays.append({**row, "code": exc.code, "reason": exc.message})
            continue
        moves.append({**row, "target": target.name, "operation": str(op.pk), "mover": op.action})
    result = {"host": host.name, "moves": moves, "stays": stays}
    with transaction.atomic():
        audit_record(actor=actor, action="host.drain", obj=host, after=result)
    return result


# Periodic work each host's worker does on its own VMs. The installation's one beat
# (docs/operations.md) cannot address them by its own SANDBOX_HOST_NAME: it schedules
# ``vms.tasks.host_periodic_fanout_task`` on the shared queue, which sends them to each host.
HOST_PERIODIC_TASKS = frozenset(
    {
        "vms.tasks.vms_reconcile_task",
        "vms.tasks.vms_sample_task",
        "snapshots.tasks.snapshot_retention_task",
        "snapshots.tasks.golden_maintain_task",
    }
)


def host_periodic_fanout(*, task_name: str, expires: float, now=None) -> list[str]:
    """Send the periodic ``task_name`` to the queue of every active host whose worker is alive
    (heartbeat within ``SANDBOX_HOST_DOWN_SECONDS``: a dead worker's queue would only pile up
    messages; a worker reconciles when it starts anyway). Each message expires after
    ``expires`` seconds, so a slow worker never runs a backlog. Returns the hosts' names."""
    if task_name not in HOST_PERIODIC_TASKS:
        raise ApplicationError(f"{task_name!r} is not a per-host periodic task.", details={"task": task_name})
    now = now or timezone.now()
    since = now - datetime.timedelta(seconds=settings.SANDBOX_HOST_DOWN_SECONDS)
    names = list(
        Host.objects.filter(is_active=True, last_seen_at__gte=since).order_by("name").values_list("name", flat=True)
    )
    for name in names:
        current_app.send_task(task_name, queue=f"host.{name}", expires=expires)
    return names


def host_migration_cert(*, host: Host, actor=None) -> pki.CertFiles:
    """Issue ``host``'s live-migration certificate (signed by the migration CA, naming its
    tunnel address), audited ``host.migration_cert``. With it on the host (and the migration
    CA's certificate), migrations to and from it are encrypted and authenticated; a host that
    has it takes migrations over TLS only. Needs the host's tunnel address."""
    if not host.tunnel_address:
        raise ApplicationError(
            f"Host {host.name} needs a tunnel address (its underlay) for a migration certificate.",
            details={"host": host.name},
        )
    files = pki.host_migration_cert_issue(host.name, str(host.tunnel_address))
    with transaction.atomic():
        audit_record(
            actor=actor, action="host.migration_cert", obj=host, after={"tunnel_address": str(host.tunnel_address)}
        )
    return files
