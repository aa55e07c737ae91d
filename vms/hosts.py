"""Host lifecycle an operator drives: cordon (placement puts no new VMs there; its VMs keep
running), uncordon, remove (an empty host leaves for good), and join (``manage.py host_join``:
register a host and issue the certificate its hostd's TLS listener presents). Every change is
audited."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import transaction

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
