"""Small state events to channel groups (never console bytes: group_send drops when full)."""

from __future__ import annotations

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

logger = logging.getLogger(__name__)


def vm_group(vm_id) -> str:
    return f"vms.vm.{vm_id}"


def user_group(user_id) -> str:
    return f"vms.user.{user_id}"


def vm_event_publish(vm, *, kind: str = "vm.state", extra: dict | None = None) -> None:
    """Tell dashboards that a VM changed. Best effort: a down channel layer only logs."""
    layer = get_channel_layer()
    if layer is None:
        return
    message = {"type": "vm.event", "kind": kind, "vm": str(vm.id), "state": vm.state, **(extra or {})}
    try:
        async_to_sync(layer.group_send)(vm_group(vm.id), message)
        async_to_sync(layer.group_send)(user_group(vm.owner_id), message)
    except Exception:  # the event is a hint; the database is the truth
        logger.warning("could not publish %s for vm %s", kind, vm.id, exc_info=True)
