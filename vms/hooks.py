"""Points where other apps join the VM lifecycle without vms importing them.

An app registers its functions from its ``AppConfig.ready`` (networking: NIC allocation,
plumbing, release; see ``networking.apps``), the way snapshots registers its operation
handlers with ``vms.operations.operation_handler_register``. vms calls ``hook_run`` and never
imports those apps. Hooks run in registration order; an exception propagates to the caller
(which decides whether the step fails or only logs).

Hook names and their keyword arguments:

- ``vm_created(vm, actor, nics)``: in the transaction that creates the VM row (create and clone);
  ``nics`` is what the create request asked for (None: the default);
- ``vm_before_launch(vm) -> list[str]``: on the VM's host, before a VMM is launched or
  restored; returns lines for the operation log;
- ``vm_vmm_gone(vm)``: on the VM's host, after its VMM stopped (stop, delete, failed create);
- ``vm_row_deleting(vm)``: in the transaction that deletes the VM row;
- ``vm_nics(vm) -> list | None``: the VM's NICs in guest order (``tap``, ``mac``, ``device_id``;
  the first also ``kernel_args``) for the VmSpec;
- ``vm_nics_check(actor, nics)``: before ``vm_create``'s transaction when the request names
  its NICs: raises when one is refused (unknown network, no right to use it, bad address);
- ``vm_agent_ready(vm) -> list[str]``: on the VM's host, each time its guest agent answered
  after a boot or restore (networking configures the NICs after the first); lines for the
  operation log;
- ``vm_counters(vm) -> dict``: extra counters in ``Driver.counters``' shape (sampling);
- ``vm_addresses(vm_ids) -> dict[str, list[str]]``: the IP addresses of those VMs by VM id (pages);
- ``host_worker_ready(host)``: once when a worker of ``host`` starts, after the VM reconcile;
- ``vm_create_source(vm, start) -> (action, params) | None``: in the transaction that creates
  a VM from a template: the operation that brings it up instead of a cold ``create``
  (snapshots: ``clone`` from the template's golden snapshot);
- ``vm_pool_take(owner, vm_name, template, image, vcpus, memory_mib, disk_gib, metadata, start, actor)
  -> (vm, operation) | None``: in ``vm_create``'s transaction after its quota and name checks:
  a VM of the template's warm pool taken for the owner instead of a new row (snapshots);
- ``host_tunnel_changed(host)``: after a host's tunnel address changed (``host_join``, its
  heartbeat's ``SANDBOX_TUNNEL_ADDRESS``); networking re-syncs the VXLAN tunnels of that host
  and of its peers (on their queues);
- ``vm_owner_changed(vm)``: on the VM's host, after a pool VM got its owner and before it
  runs again (networking re-applies the tenant rules);
- ``vm_move_check(vm, target)``: in ``vm_move``'s request, before anything changes: raises
  when the VM cannot move to host ``target`` (networking: its forwarded host ports are taken
  there; snapshots: one of its snapshots is being taken or deleted);
- ``vm_move_files(vm) -> list[Path]``: on the VM's (source) host: the files besides its
  runtime directory that must be on the target (snapshots: its snapshots' files and the
  layers its disk chain stands on);
- ``vm_move_layers(vm) -> list[str]``: the absolute paths of the disk layers recorded for the VM
  (snapshots: its own snapshots' layers and those of the snapshot it descends from): the only
  files outside the images' directories its disk chain may name for a move to copy;
- ``vm_host_changed(vm, source, target)``: in the transaction that records a moved VM on its
  new host (snapshots: its snapshots' host; networking: its port forwards, rules on both);
- ``vm_migrated_away(vm, host)``: on ``host``, after the VM live-migrated from it to
  ``vm.host`` and its VMM there was removed (networking removes its TAPs here and re-syncs);
- ``vm_migrate_check(vm, target)``: in ``vm_migrate``'s request, before anything changes:
  raises (``migration_unsupported``: drain then cold-moves the VM) when the VM cannot migrate
  live (snapshots: it has snapshots, whose files only a cold move copies);
- ``vm_migrated(vm, source, target)``: on the target host, once the VM runs there and its row
  names it (files that belong with the VM, e.g. its snapshots, may follow it from ``source``);
- ``host_golden_holders(template) -> set`` of host ids holding a ready golden snapshot of the
  template (snapshots): placement prefers them among equally roomy hosts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

HOOK_NAMES = (
    "vm_created",
    "vm_before_launch",
    "vm_vmm_gone",
    "vm_row_deleting",
    "vm_nics",
    "vm_nics_check",
    "vm_agent_ready",
    "vm_counters",
    "vm_addresses",
    "host_worker_ready",
    "vm_create_source",
    "vm_pool_take",
    "vm_owner_changed",
    "host_tunnel_changed",
    "host_golden_holders",
    "vm_move_check",
    "vm_move_files",
    "vm_move_layers",
    "vm_host_changed",
    "vm_migrated_away",
    "vm_migrated",
    "vm_migrate_check",
)

_hooks: dict[str, list[Callable[..., Any]]] = {name: [] for name in HOOK_NAMES}


def hook_register(name: str, fn: Callable[..., Any]) -> None:
    """Add ``fn`` to hook ``name`` (idempotent: registering the same function twice is a no-op)."""
    if name not in _hooks:
        raise ValueError(f"unknown VM hook {name!r}")
    if fn not in _hooks[name]:
        _hooks[name].append(fn)


def hook_run(name: str, **kwargs: Any) -> list[Any]:
    """Call every function of hook ``name``; returns their results in order."""
    return [fn(**kwargs) for fn in _hooks[name]]


def hook_first(name: str, **kwargs: Any) -> Any:
    """The first non-None result of hook ``name``, or None."""
    for fn in _hooks[name]:
        result = fn(**kwargs)
        if result is not None:
            return result
    return None
