"""Small state events to channel groups (never console bytes: group_send drops when full)."""

from __future__ import annotations

from sandbox_site.group_events import group_events_publish


def vm_group(vm_id) -> str:
    return f"vms.vm.{vm_id}"


def user_group(user_id) -> str:
    return f"vms.user.{user_id}"


def _publish(vm_id, owner_id, message: dict) -> None:
    groups = [vm_group(vm_id)] + ([user_group(owner_id)] if owner_id is not None else [])
    group_events_publish(groups, message, what=f"{message.get('kind')} event of vm {vm_id}")


def vm_event_publish(vm, *, kind: str = "vm.state", extra: dict | None = None) -> None:
    """Tell dashboards that a VM changed. Best effort: a down channel layer only logs."""
    message = {"type": "vm.event", "kind": kind, "vm": str(vm.id), "state": vm.state, **(extra or {})}
    _publish(vm.id, vm.owner_id, message)


def operation_step(log: str) -> str:
    """The step an operation is at: its newest log line without the time stamp."""
    lines = log.strip().splitlines()
    last = lines[-1] if lines else ""
    stamp, _, rest = last.partition(" ")
    return rest if len(stamp) == 8 and stamp.count(":") == 2 else last


def operation_event_publish(op) -> None:
    """Tell the VM's dashboards how an operation progresses (``kind: "operation"``: status,
    percent, the step from its newest log line, seconds since it started). Best effort."""
    if op.vm_ref is None:
        return
    from django.utils import timezone

    since = op.started_at or op.created_at
    end = op.finished_at or timezone.now()
    message = {
        "type": "vm.event",
        "kind": "operation",
        "vm": str(op.vm_ref),
        "operation": {
            "id": str(op.pk),
            "action": op.action,
            "status": op.status,
            "progress": op.progress,
            "step": operation_step(op.log)[:200],
            "error": (op.error or "")[:500],
            "elapsed": round((end - since).total_seconds(), 1) if since else 0,
        },
    }
    _publish(op.vm_ref, op.vm_owner_id, message)
