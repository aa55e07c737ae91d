"""Operations: one long action on a VM (create, start, stop, snapshot, ...) as a database row,
run by a Celery task on the VM's host queue.

Life of an operation: ``operation_new`` (in the request's transaction) ->
``operation_enqueue`` (the task is sent after commit) -> ``operation_execute`` on a worker:
``operation_claim`` (compare-and-set pending -> running, recording ``host:pid``), the action's
handler (``operation_handler_register``: vms.lifecycle registers the VM actions, snapshots its
own), then succeeded/failed with a bounded log. Handlers are idempotent, so a redelivered task
(worker killed mid-way) resumes or finishes cleanly. ``vms_reconcile`` (beat, and once at
worker start) compares recorded state with what runs on the host.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from accounts.audit import audit_record
from accounts.models import AuditResult
from sandbox_site.errors import ApplicationError
from vms import hypervisor
from vms.events import operation_event_publish
from vms.models import VM, Host, Operation, VmState
from vms.transitions import IN_PLACE_STATES, TRANSITIONAL_STATES
from vms.vmm.base import RuntimeState, VmmError, VmSpec

logger = logging.getLogger(__name__)
S = VmState

MAX_ATTEMPTS = 3  # deliveries of one operation before the reconciler gives up on it
STUCK_GRACE_SECONDS = 60
PENDING_LIMIT_SECONDS = 3600
ORPHAN_DRIVERS = ("qemu", "cloud-hypervisor")  # drivers whose leftovers an orphan directory may hold

_HANDLERS: dict[str, Callable[[Operation, VM], None]] = {}


def operation_handler_register(action: str, fn: Callable[[Operation, VM], None]) -> None:
    """Let an app run its operations: ``fn(op, vm)``, idempotent. vms.lifecycle registers the
    VM actions and snapshots "snapshot", "restore", "clone" from their ``AppConfig.ready``."""
    existing = _HANDLERS.get(action)
    if existing is not None and existing is not fn:
        raise ValueError(f"operation {action!r} already has a handler")
    _HANDLERS[action] = fn


def operation_new(*, vm: VM, action: str, actor, params: dict | None = None) -> Operation:
    """Record a pending operation on ``vm`` (call inside the request's transaction)."""
    from accounts.context import current_context

    return Operation.objects.create(
        vm=vm,
        vm_ref=vm.pk,
        vm_owner_id=vm.owner_id,
        action=action,
        params=params or {},
        requested_by=actor if getattr(actor, "is_authenticated", False) else None,
        request_id=current_context().request_id,
    )


def operation_enqueue(op: Operation, vm: VM) -> None:
    """Send the operation's task to the VM's host queue once the transaction commits."""
    from vms.tasks import operation_run_task

    queue = vm.host.queue if vm.host_id else "shared"
    transaction.on_commit(lambda: operation_run_task.apply_async(args=[str(op.pk)], queue=queue))


def operation_log(op: Operation, line: str, *, progress: int | None = None) -> None:
    """Append a line to the operation log, keeping at most Operation.LOG_LIMIT characters."""
    stamp = timezone.now().strftime("%H:%M:%S")
    text = (op.log + f"{stamp} {line}\n")[-Operation.LOG_LIMIT :]
    op.log = text
    fields: dict = {"log": text}
    if progress is not None:
        op.progress = progress
        fields["progress"] = progress
    Operation.objects.filter(pk=op.pk).update(**fields)
    operation_event_publish(op)  # the VM page shows the step and percent live


def operation_worker_id() -> str:
    return f"{settings.SANDBOX_HOST_NAME}:{os.getpid()}"


def operation_worker_alive(worker: str) -> bool:
    """Whether the worker process that claimed an operation still runs. Workers of other
    hosts are assumed alive: only their own host can tell."""
    host, _, pid = worker.rpartition(":")
    if host != settings.SANDBOX_HOST_NAME or not pid.isdigit():
        return True
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"celery" in fh.read()
    except OSError:
        return False


def operation_claim(op: Operation) -> bool:
    """Compare-and-set the operation to running for this worker. A pending operation, or a
    running one whose worker died, can be claimed; anything else belongs to someone else."""
    me = operation_worker_id()
    fields = {"status": Operation.Status.RUNNING, "worker": me, "attempts": F("attempts") + 1}
    if Operation.objects.filter(pk=op.pk, status=Operation.Status.PENDING).update(
        started_at=op.started_at or timezone.now(), **fields
    ):
        return True
    if op.status == Operation.Status.RUNNING and op.worker != me and not operation_worker_alive(op.worker):
        return bool(
            Operation.objects.filter(pk=op.pk, status=Operation.Status.RUNNING, worker=op.worker).update(**fields)
        )
    return False


def operation_run(op: Operation) -> None:
    """Call the handler of ``op``'s action with its VM (no claim, no bookkeeping)."""
    vm = VM.objects.select_related("template__image", "owner", "host").filter(pk=op.vm_id).first()
    if vm is None:
        if op.action == "delete":
            return
        raise ApplicationError("The VM no longer exists.")
    _HANDLERS[op.action](op, vm)


def operation_execute(op_id) -> Operation | None:
    """Claim and run one operation; idempotent (a redelivered task resumes or finishes cleanly)."""
    op = Operation.objects.filter(pk=op_id).first()
    if op is None or not operation_claim(op):
        return op
    op.refresh_from_db()
    try:
        operation_run(op)
    except Exception as exc:
        message = getattr(exc, "message", None) or str(exc) or exc.__class__.__name__
        logger.exception("operation %s (%s) failed", op.pk, op.action)
        operation_log(op, f"failed: {message}")
        Operation.objects.filter(pk=op.pk).update(
            status=Operation.Status.FAILED, error=message[:2000], finished_at=timezone.now()
        )
        with transaction.atomic():
            audit_record(
                actor=op.requested_by,
                action=f"vm.{op.action}",
                object_type="vms.vm",
                object_id=str(op.vm_ref),
                object_owner_id=op.vm_owner_id,
                result=AuditResult.FAILED,
                message=message[:2000],
            )
    else:
        operation_log(op, "done", progress=100)
        Operation.objects.filter(pk=op.pk).update(
            status=Operation.Status.SUCCEEDED, finished_at=timezone.now(), progress=100
        )
    op.refresh_from_db()
    operation_event_publish(op)
    return op


# --- reconciliation ---------------------------------------------------------------------


def _settle_transitional(vm: VM, now) -> int:
    """A VM in a transitional state belongs to its live operation. When that operation's
    worker died, re-enqueue it (handlers are idempotent) up to MAX_ATTEMPTS, then give up:
    an in-place action (pause, snapshot, ...) settles to what the VMM reports; the others stop
    the VMM and mark the VM error. Returns 1 when something had to be done."""
    from vms import lifecycle

    live = (
        Operation.objects.filter(vm=vm, status__in=[Operation.Status.PENDING, Operation.Status.RUNNING])
        .order_by("-created_at")
        .first()
    )
    if live is not None and live.status == Operation.Status.PENDING:
        if (now - live.created_at).total_seconds() < PENDING_LIMIT_SECONDS:
            return 0  # queued behind other work
    elif live is not None and operation_worker_alive(live.worker):
        limit = settings.SANDBOX_BOOT_TIMEOUT + settings.SANDBOX_STOP_TIMEOUT + STUCK_GRACE_SECONDS
        if live.action == "snapshot":
            limit += 3600  # a memory dump of a big VM under TCG takes long
        if (now - (live.started_at or live.created_at)).total_seconds() < limit:
            return 0
    if live is not None and live.attempts < MAX_ATTEMPTS and live.status == Operation.Status.RUNNING:
        if Operation.objects.filter(pk=live.pk, status=Operation.Status.RUNNING, worker=live.worker).update(
            status=Operation.Status.PENDING
        ):
            operation_log(live, f"worker {live.worker} was lost; retrying (attempt {live.attempts + 1})")
            operation_enqueue(live, vm)
        return 1
    if live is not None:
        Operation.objects.filter(pk=live.pk).update(
            status=Operation.Status.FAILED, error="The worker running this operation was lost.", finished_at=now
        )
    if vm.state in IN_PLACE_STATES:
        previous = (live.params.get("previous_state") if live is not None else None) or S.RUNNING
        lifecycle.vm_settle(vm, expected={vm.state}, previous=previous, why=f"Operation lost while {vm.state}")
        return 1
    if vm.driver:
        lifecycle.vmm_kill_quietly(vm)
    lifecycle.vm_fail(vm, f"Operation lost while {vm.state}; the VMM was stopped.", expected={vm.state})
    return 1


def _orphans_remove(root) -> int:
    known = {str(pk) for pk in VM.objects.values_list("pk", flat=True)}
    removed = 0
    for entry in root.iterdir():
        if entry.is_dir() and entry.name not in known and len(entry.name) == 36:
            orphan = VmSpec(vm_id=entry.name, runtime_dir=entry, kernel=entry, base_image=entry)
            for name in ORPHAN_DRIVERS:
                try:
                    hypervisor.driver_for(name).cleanup(orphan)
                except Exception:
                    logger.warning("orphan cleanup of %s failed", entry, exc_info=True)
            removed += 1
    return removed


def vms_reconcile(host: Host) -> dict[str, int]:
    """Compare recorded state with what runs on this host: a VMM that is gone turns its VM to
    error (keeping the last console lines); a guest that powered itself off turns it to
    stopped; a transitional state whose operation died is retried or settled; runtime
    directories of VMs that no longer exist are removed."""
    from vms import lifecycle

    counts = {"died": 0, "powered_off": 0, "stuck": 0, "orphans": 0}
    now = timezone.now()
    for vm in VM.objects.filter(host=host).select_related("template__image", "host"):
        if vm.state in (S.RUNNING, S.PAUSED) and vm.driver:
            try:
                info = hypervisor.driver_for(vm.driver).info(hypervisor.vm_spec(vm), timeout=3.0)
            except VmmError:
                continue
            if info.state == RuntimeState.GONE:
                message = "The VMM process exited unexpectedly."
                if info.reason:
                    message += f" ({info.reason})"
                if lifecycle.vm_fail(vm, message, expected={vm.state}):
                    counts["died"] += 1
            elif info.state == RuntimeState.SHUTDOWN and lifecycle.vm_powered_off(
                vm, reason=info.reason or "the guest powered off"
            ):
                counts["powered_off"] += 1
        elif vm.state in TRANSITIONAL_STATES:
            counts["stuck"] += _settle_transitional(vm, now)
    root = settings.SANDBOX_RUNTIME_DIR
    if root.is_dir():
        counts["orphans"] = _orphans_remove(root)
    Host.objects.filter(pk=host.pk).update(last_seen_at=now)
    return counts
