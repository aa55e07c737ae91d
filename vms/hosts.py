"""Host lifecycle an operator drives: cordon (placement puts no new VMs there; its VMs keep
running) and uncordon. Every change is audited."""

from __future__ import annotations

from django.db import transaction

from accounts.audit import audit_record
from accounts.permissions import require_perm
from vms.models import Host


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
