"""Host lifecycle an operator drives: cordon (placement puts no new VMs there; its VMs keep
running), uncordon, and remove (an empty host leaves for good). Every change is audited."""

from __future__ import annotations

from django.db import transaction

from accounts.audit import audit_record
from accounts.permissions import require_perm
from sandbox_site.errors import ConflictError
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
