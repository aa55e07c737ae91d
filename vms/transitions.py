"""The VM state machine: the one table of allowed changes and the one compare-and-set.

Requests and workers change a VM's state only through ``vm_transition`` (a compare-and-set:
``filter(pk=.., state__in=expected).update(state=new, ...)``; zero rows means someone else
won) and publish the VM's event when they win. Nothing here talks to a VMM, and no caller
holds the VM's row lock while it talks to one: an operation that needs the VMM moves the VM
to its transitional state first (``during``), calls the VMM outside any transaction, then
compare-and-sets the outcome (``done``, or back to the state it started from).

Table (``TRANSITIONS``), one row per action:

=========  =====================================================  ============  =================
action     allowed from                                           during        done
=========  =====================================================  ============  =================
create     (row is created ``creating``)                          creating      starting (then as
                                                                                start), stopped
clone      (row is created ``creating``)                          creating      starting (then as
                                                                                restore)
start      stopped, error                                         starting      running
stop       running, paused, starting, error, pausing, resuming,   stopping      stopped
           rebooting, resizing, unknown
reboot     running                                                rebooting     running
pause      running                                                pausing       paused
resume     paused                                                 resuming      running
resize     running, paused (a stopped VM is resized in place)     resizing      state before
nic_hotplug running (a stopped VM's NICs change in place)          resizing      state before
snapshot   running, paused, stopped                               snapshotting  state before
restore    running, paused, stopped, error                        starting      running
move       running, stopped                                       moving        stopped; starting
                                                                                (then as start)
migrate    running (live, to another host: ``vms.migration``)     migrating     running
delete     every state but deleting, snapshotting, moving and     deleting      (row removed)
           migrating
=========  =====================================================  ============  =================

A move (``vms.moves``) keeps the VM ``moving`` on its source host while its files are copied;
the worker of the target host switches its host and sets ``stopped``, or ``starting`` and
boots it as a start. A failure before the switch leaves it on the source (stopped, or running
again when the copy failed on the source's worker).

A create from a template's golden snapshot is a ``clone``; when that snapshot is gone, fails
verification or cannot be restored, the VM goes back to ``creating`` (its VMM killed) and
the same operation cold boots it as a ``create`` (``snapshots.lifecycle``).

A failed operation leaves: ``error`` for create/clone/start/restore/stop (the VMM is killed);
for the in-place actions (pause, resume, reboot, resize, snapshot) the state the VMM reports
(``running``/``paused``; ``error`` when it is gone, ``stopped`` when it was stopped before).
Stop and delete are refused (409) while a snapshot is being taken or the VM migrates: the snapshot finishes
first, then the VM can be stopped or deleted. The reconciler adds: running/paused ->
``error`` (VMM gone) or ``stopped`` (guest powered off); a transitional state whose worker
died is retried, then settled (``vms.operations.vms_reconcile``).

Host heartbeats (``HOST_DOWN_FROM``): a running or paused VM whose host stops answering (its
worker's heartbeat or its hostd, ``vms.operations.hosts_check``) becomes ``unknown``, never
by a request; when the host answers again its reconcile puts the VM in the state its VMM
reports (``running``/``paused``; ``error`` when the VMM is gone, ``stopped`` when the guest
powered off). An ``unknown`` VM can be stopped or deleted (the operation runs once its host
is back).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from django.db import transaction
from django.utils import timezone

from sandbox_site.errors import ConflictError
from vms.events import vm_event_publish
from vms.models import VM, Operation, VmState

S = VmState

STABLE_STATES = frozenset({S.STOPPED, S.RUNNING, S.PAUSED, S.ERROR})
# The reconciler's own moves (no action, no operation): running/paused -> unknown while the
# VM's host is down; unknown -> what the VMM reports (HOST_BACK_TO) once it answers again.
HOST_DOWN_FROM = frozenset({S.RUNNING, S.PAUSED})
HOST_BACK_TO = frozenset({S.RUNNING, S.PAUSED, S.STOPPED, S.ERROR})
# Transitional states whose VMM keeps running (or stays stopped) while the operation runs:
# when it fails, the VM settles to what the VMM reports rather than to error.
IN_PLACE_STATES = frozenset({S.PAUSING, S.RESUMING, S.REBOOTING, S.RESIZING, S.SNAPSHOTTING, S.MIGRATING})
# Transitional states that replace or remove the VMM.
REPLACING_STATES = frozenset({S.CREATING, S.STARTING, S.STOPPING, S.DELETING, S.MOVING})
TRANSITIONAL_STATES = IN_PLACE_STATES | REPLACING_STATES

# A resize, snapshot or live migration of a running VM keeps the guest running (a snapshot
# pauses it only for the memory dump, a migration for its last round; across the host switch the
# agent is reached on the new host), so its agent and console stay usable.
GUEST_RUNS_DURING = frozenset({S.RESIZING, S.SNAPSHOTTING, S.MIGRATING})

PREVIOUS = "previous"  # ``done`` marker: back to the state the VM had when the action was asked


@dataclass(frozen=True)
class Transition:
    allowed_from: frozenset[str]
    during: str  # state while the operation runs (set by the request with a compare-and-set)
    done: str | None  # state the worker sets on success; PREVIOUS; None when the row goes
    perm: str | None = None  # object permission the action needs (None: checked by its app)


TRANSITIONS: dict[str, Transition] = {
    "create": Transition(frozenset({S.CREATING}), S.CREATING, S.STARTING),
    "clone": Transition(frozenset({S.CREATING}), S.CREATING, S.STARTING),
    "start": Transition(frozenset({S.STOPPED, S.ERROR}), S.STARTING, S.RUNNING, "vms.power_vm"),
    "stop": Transition(
        frozenset(
            {S.RUNNING, S.PAUSED, S.STARTING, S.ERROR, S.PAUSING, S.RESUMING, S.REBOOTING, S.RESIZING, S.UNKNOWN}
        ),
        S.STOPPING,
        S.STOPPED,
        "vms.power_vm",
    ),
    "reboot": Transition(frozenset({S.RUNNING}), S.REBOOTING, S.RUNNING, "vms.power_vm"),
    "pause": Transition(frozenset({S.RUNNING}), S.PAUSING, S.PAUSED, "vms.power_vm"),
    "resume": Transition(frozenset({S.PAUSED}), S.RESUMING, S.RUNNING, "vms.power_vm"),
    "resize": Transition(frozenset({S.RUNNING, S.PAUSED}), S.RESIZING, PREVIOUS, "vms.change_vm"),
    "snapshot": Transition(frozenset({S.RUNNING, S.PAUSED, S.STOPPED}), S.SNAPSHOTTING, PREVIOUS),
    # Hot-plug or unplug of a NIC (networking): the guest keeps running, shown as resizing.
    "nic_hotplug": Transition(frozenset({S.RUNNING}), S.RESIZING, PREVIOUS, "vms.change_vm"),
    "restore": Transition(frozenset({S.RUNNING, S.PAUSED, S.STOPPED, S.ERROR}), S.STARTING, S.RUNNING),
    # A cold move to another host (vms.moves): a running VM is stopped, moved, started there.
    "move": Transition(frozenset({S.RUNNING, S.STOPPED}), S.MOVING, PREVIOUS),
    # Live migration (operators: the right is checked by vms.migration on the target host).
    "migrate": Transition(frozenset({S.RUNNING}), S.MIGRATING, S.RUNNING),
    "delete": Transition(
        frozenset(set(S.values) - {S.DELETING, S.SNAPSHOTTING, S.MOVING, S.MIGRATING}),
        S.DELETING,
        None,
        "vms.delete_vm",
    ),
}


def vm_guest_running(vm: VM) -> bool:
    """Whether ``vm``'s guest runs, so exec, files, agent and console input may reach it:
    ``running``, or resizing/snapshotting/migrating a VM that was running when the action began."""
    if vm.state == S.RUNNING:
        return True
    if vm.state not in GUEST_RUNS_DURING:
        return False
    params = (
        Operation.objects.filter(
            vm_id=vm.pk,
            action__in=["resize", "snapshot", "nic_hotplug", "migrate"],
            status__in=[Operation.Status.PENDING, Operation.Status.RUNNING],
        )
        .order_by("-created_at")
        .values_list("params", flat=True)
        .first()
    )
    return bool(params) and params.get("previous_state") == S.RUNNING


def vm_actions_allowed(state: str) -> list[str]:
    """The actions a request may ask for a VM in ``state`` (for dashboards and the API)."""
    return list(_actions_allowed_from(state))


@functools.lru_cache(maxsize=64)  # TRANSITIONS is a constant table; a list page asks once per row
def _actions_allowed_from(state: str) -> tuple[str, ...]:
    # A move is an operator's action naming a host (the hosts page and API), not a VM button.
    internal = ("create", "clone", "move")
    return tuple(sorted(a for a, rule in TRANSITIONS.items() if a not in internal and state in rule.allowed_from))


def vm_transition(vm: VM, *, expected: set[str] | frozenset[str], new: str, **fields) -> bool:
    """Compare-and-set ``vm``'s state from one of ``expected`` to ``new`` (with ``fields``).
    True when this caller won: ``vm`` is refreshed and its event published (after commit
    when inside a transaction). False when the state was not one of ``expected``."""
    won = VM.objects.filter(pk=vm.pk, state__in=list(expected)).update(state=new, updated_at=timezone.now(), **fields)
    if not won:
        return False
    vm.refresh_from_db()
    transaction.on_commit(lambda: vm_event_publish(vm))
    return True


def vm_transition_request(vm: VM, action: str, *, allowed: frozenset[str] | None = None) -> str:
    """Move ``vm`` into the transitional state of ``action`` (compare-and-set), or raise
    ``ConflictError`` (409) naming the current state. Returns the state it had before (kept in
    the operation's params so the worker can go back to it). ``allowed`` narrows the table's
    ``allowed_from`` (e.g. a memory snapshot needs a VMM)."""
    rule = TRANSITIONS[action]
    allowed = rule.allowed_from if allowed is None else allowed & rule.allowed_from
    for _attempt in range(3):
        before = VM.objects.filter(pk=vm.pk).values_list("state", flat=True).first()
        if before is None or before not in allowed:
            break
        if VM.objects.filter(pk=vm.pk, state=before).update(state=rule.during, updated_at=timezone.now()):
            vm.refresh_from_db()
            transaction.on_commit(lambda: vm_event_publish(vm))
            return before
        # The state changed between the read and the update: look again.
    vm.refresh_from_db()
    raise ConflictError(
        f"Cannot {action} a VM that is {vm.state}.",
        details={"state": vm.state, "allowed_from": sorted(allowed)},
    )


def vm_host_down(vm: VM) -> bool:
    """The VM's host stopped answering: running/paused -> ``unknown`` (compare-and-set)."""
    return vm_transition(vm, expected=HOST_DOWN_FROM, new=S.UNKNOWN)


def vm_host_back(vm: VM, new: str, **fields) -> bool:
    """The VM's host answers again: ``unknown`` -> what its VMM reports (``HOST_BACK_TO``)."""
    if new not in HOST_BACK_TO:
        raise ValueError(f"unknown -> {new} is not a reconcile outcome")
    return vm_transition(vm, expected={S.UNKNOWN}, new=new, **fields)


def vm_transition_done(vm: VM, action: str, *, previous: str | None = None, **fields) -> bool:
    """Worker side: compare-and-set from ``action``'s transitional state to its outcome
    (``previous`` for the actions that go back to where they started). False when someone
    else moved the VM meanwhile (e.g. a stop during a boot): their operation owns it now."""
    rule = TRANSITIONS[action]
    new = previous if rule.done == PREVIOUS else rule.done
    if new is None:
        raise ValueError(f"{action} has no outcome state")
    return vm_transition(vm, expected={rule.during}, new=new, **fields)
