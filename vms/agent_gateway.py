"""The one way Django code reaches a VM's guest agent (skeleton: being consolidated).

Every agent request from web processes, Celery workers and snapshots goes through these
functions: through the host daemon when it runs (it holds the one agent connection of each
VM), directly otherwise. One error type, one mapping to the API's error shape.
"""

from __future__ import annotations

from vms.models import VM


def agent_call(
    vm: VM, op: str, args: dict | None = None, data: bytes = b"", *, timeout: float = 30.0
) -> tuple[dict, bytes]:
    """One agent request; returns ``(result, data)``. Raises ``ApplicationError`` (mapped)."""
    from vms.exec_services import _call

    return _call(vm, op, args, data, timeout=timeout)


def agent_wait(vm: VM, *, timeout: float) -> dict:
    """Block until the guest agent answers a ping (a VM is ``running`` only then)."""
    from vms import hypervisor

    return hypervisor.agent_wait(hypervisor.vm_spec(vm), vm.driver or "qemu", timeout=timeout)


def agent_ping(vm: VM, *, timeout: float = 5.0) -> dict:
    from vms import hypervisor

    return hypervisor.agent_ping(hypervisor.vm_spec(vm), vm.driver or "qemu", timeout=timeout)
