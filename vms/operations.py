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
from types import SimpleNamespace

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from accounts.audit import audit_record
from accounts.models import AuditResult
from sandbox_site import metrics
from sandbox_site.errors import ApplicationError
from vms import hypervisor
from vms.events import operation_event_publish
from vms.hooks import hook_run
from vms.hostd.logcontext import log_context
from vms.models import VM, Host, Operation, VmState
from vms.transitions import IN_PLACE_STATES, TRANSITIONAL_STATES, vm_host_back, vm_host_down
from vms.vmm.base import RuntimeState, VmmError, VmSpec

logger = logging.getLogger(__name__)
S = VmState

MAX_ATTEMPTS = 3  # deliveries of one operation before the reconciler gives up on it
STUCK_GRACE_SECONDS = 60
PENDING_LIMIT_SECONDS = 3600
MOVE_STEP_SECONDS = 6 * 3600  # a move (copying a big disk chain) may take this much longer
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


def operation_enqueue(op: Operation, vm: VM, *, queue: str | None = None) -> None:
    """Send the operation's task to the VM's host queue (or ``queue``: a step of a live
    migration runs on the target host) once the transaction commits."""
    from vms.tasks import operation_run_task

    queue = queue or operation_queue(op, vm)
    transaction.on_commit(lambda: operation_run_task.apply_async(args=[str(op.pk)], queue=queue))


def operation_queue(op: Operation, vm: VM | None) -> str:
    """The queue that runs ``op``: the host a handler handed it to (``OperationHandoff``),
    else the VM's host's."""
    queue = (op.params or {}).get("queue")
    if isinstance(queue, str) and queue:
        return queue
    return vm.host.queue if vm is not None and vm.host_id else "shared"


class OperationHandoff(Exception):  # noqa: N818 - a signal to operation_execute, not an error
    """Raised by a handler whose step here is done and whose next step runs from ``queue``
    (a host's ``host.<name>``: its worker touches that host's files and VMM): the operation
    goes back to pending with ``params`` (its step recorded there) and is sent to that queue;
    ``line`` goes to its log. A cold move stops on its source, copies from the control plane,
    lands on its target and cleans up on its source (vms.moves); a live migration alternates
    between source and target (vms.migration). Handlers check which step they are at from
    ``op.params``, so a step delivered to the wrong host hands itself off again."""

    def __init__(self, queue: str, params: dict, line: str = "") -> None:
        super().__init__(line or queue)
        self.queue = queue
        self.params = params
        self.line = line


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


class OperationDeferred(Exception):
    """The owner already runs SANDBOX_OPERATIONS_PER_OWNER operations: this one waits."""


def operation_claim(op: Operation) -> bool:
    """Compare-and-set the operation to running for this worker. A pending operation, or a
    running one whose worker died, can be claimed; anything else belongs to someone else.
    A pending one whose owner already runs SANDBOX_OPERATIONS_PER_OWNER operations raises
    ``OperationDeferred`` (counted under the owner's quota lock): one tenant's burst cannot
    hold every worker slot."""
    me = operation_worker_id()
    fields = {"status": Operation.Status.RUNNING, "worker": me, "attempts": F("attempts") + 1}
    with transaction.atomic():
        # (Not with eager tasks, a debugging mode: a deferral would run again at once, forever.)
        capped = op.vm_owner_id is not None and not settings.CELERY_TASK_ALWAYS_EAGER
        if capped and op.status == Operation.Status.PENDING:
            from accounts.services import owner_quota_lock

            owner_quota_lock(SimpleNamespace(pk=op.vm_owner_id))
            running = Operation.objects.filter(vm_owner_id=op.vm_owner_id, status=Operation.Status.RUNNING).count()
            if running >= settings.SANDBOX_OPERATIONS_PER_OWNER:
                raise OperationDeferred(f"owner {op.vm_owner_id} runs {running} operations")
        claimed = Operation.objects.filter(pk=op.pk, status=Operation.Status.PENDING).update(
            started_at=op.started_at or timezone.now(), **fields
        )
    if claimed:
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
    from vms import distribution

    # Before a VMM starts on the VM's host, its image must be there (vms.distribution): copied
    # by a control-plane worker, the operation handed there and back (OperationHandoff).
    if (op.params or {}).get("image_copy"):
        distribution.image_copy_step(op, vm)
    elif op.action in distribution.IMAGE_ACTIONS:
        distribution.image_ensure_here(op=op, vm=vm)
    _HANDLERS[op.action](op, vm)


def operation_execute(op_id) -> Operation | None:
    """Claim and run one operation; idempotent (a redelivered task resumes or finishes cleanly)."""
    op = Operation.objects.filter(pk=op_id).first()
    if op is None:
        return op
    with log_context(operation_id=op.pk, vm_id=op.vm_ref, request_id=op.request_id):
        return _operation_execute(op)


def _operation_execute(op: Operation) -> Operation | None:
    try:
        if not operation_claim(op):
            return op
    except OperationDeferred:
        _operation_defer(op)  # the worker slot goes to another owner's operation meanwhile
        return op
    op.refresh_from_db()
    if op.attempts == 1 and op.started_at is not None:
        metrics.OPERATION_QUEUE_WAIT.labels(op.action).observe(
            max(0.0, (op.started_at - op.created_at).total_seconds())
        )
    logger.info("operation %s (%s) started, attempt %d", op.pk, op.action, op.attempts)
    try:
        operation_run(op)
    except OperationHandoff as handoff:
        _operation_hand_off(op, handoff)
        return op
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
        metrics.operation_observe(op, "failed")
        _vm_settle_after_failure(op, message)
    else:
        operation_log(op, "done", progress=100)
        Operation.objects.filter(pk=op.pk).update(
            status=Operation.Status.SUCCEEDED, finished_at=timezone.now(), progress=100
        )
        metrics.operation_observe(op, "succeeded")
        logger.info("operation %s (%s) succeeded", op.pk, op.action)
    op.refresh_from_db()
    operation_event_publish(op)
    return op


def _operation_hand_off(op: Operation, handoff: OperationHandoff) -> None:
    """The next step of ``op`` runs from another queue: pending again (a fresh count of attempts:
    the reconciler's retries are per step), on that host's queue."""
    params = {**handoff.params, "queue": handoff.queue}
    if handoff.line:
        operation_log(op, handoff.line)
    handed = Operation.objects.filter(pk=op.pk, status=Operation.Status.RUNNING).update(
        status=Operation.Status.PENDING, params=params, worker="", attempts=0
    )
    op.refresh_from_db()
    if not handed:  # no longer this worker's (the reconciler gave up on it, or another delivery)
        logger.warning("operation %s (%s) was no longer running here: not handed on", op.pk, op.action)
        return
    operation_enqueue(op, op.vm)
    logger.info("operation %s (%s) handed to %s", op.pk, op.action, handoff.queue)


def _operation_defer(op: Operation) -> None:
    from vms.tasks import operation_run_task

    vm = VM.objects.select_related("host").filter(pk=op.vm_id).first()
    queue = operation_queue(op, vm)
    operation_run_task.apply_async(args=[str(op.pk)], queue=queue, countdown=settings.SANDBOX_OPERATIONS_DEFER_SECONDS)


# --- reconciliation ---------------------------------------------------------------------


def _settle_transitional(vm: VM, now) -> int:
    """A VM in a transitional state belongs to its live operation. When that operation's
    worker died, re-enqueue it (handlers are idempotent) up to MAX_ATTEMPTS, then give up:
    an in-place action (pause, snapshot, ...) settles to what the VMM reports; the others stop
    the VMM and mark the VM error. Returns 1 when something had to be done."""

    live = (
        Operation.objects.filter(vm=vm, status__in=[Operation.Status.PENDING, Operation.Status.RUNNING])
        .order_by("-created_at")
        .first()
    )
    # A move, or a boot whose image a control-plane worker copies to this host: handed between
    # queues, copying big files.
    copying = live is not None and (
        live.action == "move" or bool({"image_copy", "image_copied"} & set(live.params or {}))
    )
    if live is not None and live.status == Operation.Status.PENDING:
        limit = PENDING_LIMIT_SECONDS + (MOVE_STEP_SECONDS if copying else 0)
        if (now - live.created_at).total_seconds() < limit:
            return 0  # queued behind other work (a move: or handed to its next host's queue)
    elif live is not None and operation_worker_alive(live.worker):
        limit = settings.SANDBOX_BOOT_TIMEOUT + settings.SANDBOX_STOP_TIMEOUT + STUCK_GRACE_SECONDS
        if live.action == "snapshot":
            limit += 3600  # a memory dump of a big VM under TCG takes long
        elif copying:
            limit += MOVE_STEP_SECONDS  # copying a disk and its snapshots (or an image) between hosts
        elif live.action == "migrate":
            limit += settings.SANDBOX_MIGRATION_TIMEOUT
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
    previous = live.params.get("previous_state") if live is not None else None
    why = f"Operation lost while {vm.state}"
    if live is None:  # the last operation may have failed elsewhere (not settled there): name it
        last = Operation.objects.filter(vm=vm).order_by("-created_at").first()
        if last is not None and last.status == Operation.Status.FAILED and last.error:
            why = _failed(last.action, last.error)
            previous = (last.params or {}).get("previous_state")
    _vm_give_up(vm, previous=previous, why=why)
    return 1


def _failed(action: str, error: str) -> str:
    """Why a VM was given up when its operation failed: "Create failed: <the error>"."""
    return f"{action.capitalize()} failed: {error[:1000]}"


def _vm_give_up(vm: VM, *, previous: str | None, why: str) -> None:
    """A VM left in a transitional state with no operation to finish it: an in-place action
    settles to what the VMM reports; the others stop the VMM and mark the VM error."""
    from vms import lifecycle

    if vm.state in IN_PLACE_STATES:
        lifecycle.vm_settle(vm, expected={vm.state}, previous=previous or S.RUNNING, why=why)
        return
    if vm.driver:
        lifecycle.vmm_kill_quietly(vm)
    lifecycle.vm_fail(vm, f"{why}; the VMM was stopped." if vm.driver else f"{why}.", expected={vm.state})


def _vm_settle_after_failure(op: Operation, message: str) -> None:
    """An operation that failed while its VM is still in a transitional state (the failure came
    before its handler or past the handler's own error handling: an image check, a database
    error) settles the VM now, with the operation's error. The reconciler did it seconds later,
    calling the operation lost. Only on the VM's own host: settling asks the local VMM (a step
    that failed on a migration's target or on the control plane leaves it to the reconciler of
    the VM's host, which names the failed operation too)."""
    try:
        vm = VM.objects.select_related("host").filter(pk=op.vm_id).first()
        if vm is None or vm.state not in TRANSITIONAL_STATES:
            return
        if vm.host is None or vm.host.name != settings.SANDBOX_HOST_NAME:
            return
        if Operation.objects.filter(vm=vm, status__in=[Operation.Status.PENDING, Operation.Status.RUNNING]).exists():
            return  # another operation owns the VM now
        _vm_give_up(vm, previous=(op.params or {}).get("previous_state"), why=_failed(op.action, message))
    except Exception:  # the operation is recorded as failed already; the reconciler settles the VM
        logger.exception("operation %s (%s): could not settle VM %s after the failure", op.pk, op.action, op.vm_id)


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
    directories of VMs that no longer exist, or that live-migrated away, are removed."""
    from vms import lifecycle

    counts = {"died": 0, "powered_off": 0, "stuck": 0, "orphans": 0}
    recovered = 0
    now = timezone.now()
    hostd_up = host_heartbeat(host, now)
    for vm in VM.objects.filter(host=host).select_related("template__image", "host"):
        if vm.state == S.UNKNOWN:
            # Back to what the VMM reports only once hostd answers again (hosts_check marks
            # VMs unknown while it does not: deciding here without it would flap).
            if hostd_up and vm.driver:
                recovered += _host_back(vm)
        elif vm.state in (S.RUNNING, S.PAUSED) and vm.driver:
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
        from vms.migration import migration_leftovers_remove

        counts["orphans"] = _orphans_remove(root) + migration_leftovers_remove(host)
    for result, n in {**counts, "recovered": recovered}.items():
        if n:
            metrics.RECONCILE.labels(result).inc(n)
    metrics.RECONCILE.labels("pass").inc()
    return counts


def _host_back(vm: VM) -> int:
    """An ``unknown`` VM whose host answers again: the state its VMM reports."""
    from vms import lifecycle

    try:
        info = hypervisor.driver_for(vm.driver).info(hypervisor.vm_spec(vm), timeout=3.0)
    except VmmError:
        return 0
    if info.state == RuntimeState.RUNNING:
        return int(vm_host_back(vm, S.RUNNING))
    if info.state == RuntimeState.PAUSED:
        return int(vm_host_back(vm, S.PAUSED))
    if info.state == RuntimeState.SHUTDOWN:
        if vm_host_back(vm, S.RUNNING):
            return int(lifecycle.vm_powered_off(vm, reason=info.reason or "the guest powered off"))
        return 0
    message = "The VMM was gone when the host came back." + (f" ({info.reason})" if info.reason else "")
    return int(lifecycle.vm_fail(vm, message, expected={S.UNKNOWN}))


def host_heartbeat(host: Host, now) -> bool:
    """This host's worker is alive (it runs this): record it, with the host's capacity, its
    driver and the boot modes it runs, and whether its hostd answers (True) or not (the host
    then counts as down). The images it holds are checked by a separate, slower pass
    (``vms.inventory.host_inventory_update``): hashing must not delay the heartbeat."""
    from vms.admission import machine_capacity
    from vms.host_disk import disk_room_gib
    from vms.hostd.client import HostdClient
    from vms.hostd.errors import HostdError

    cpus, memory_mib = machine_capacity()
    fields: dict = {"last_seen_at": now, "cpus": cpus, "memory_mib": memory_mib, "disk_free_gib": disk_room_gib()}
    # What this host's driver can boot: placement sends a VM only where its image boots.
    fields["driver"] = hypervisor.driver_name_select()
    fields["boot_modes"] = hypervisor.driver_boot_modes(fields["driver"])
    if settings.SANDBOX_TUNNEL_ADDRESS:  # validated at start-up (settings)
        fields["tunnel_address"] = settings.SANDBOX_TUNNEL_ADDRESS
    try:
        with HostdClient(settings.SANDBOX_HOSTD_SOCKET, timeout=2.0) as client:
            hello, _ = client.call("hello", timeout=2.0)
            listing, _ = client.call("vm_list", timeout=2.0)
    except (HostdError, OSError) as exc:
        fields["hostd_status"] = {"up": False, "error": str(exc)[:500]}
        up = False
    else:
        vms = listing.get("vms", [])
        links = sum(1 for v in vms if (v.get("agent") or {}).get("connected"))
        fields["hostd_status"] = {
            "up": True,
            "version": hello.get("hostd_version"),
            "pid": hello.get("pid"),
            "vms": len(vms),
            "agent_links_up": links,
        }
        fields["hostd_seen_at"] = now
        up = True
    Host.objects.filter(pk=host.pk).update(**fields)
    if "tunnel_address" in fields and fields["tunnel_address"] != host.tunnel_address:
        host.tunnel_address = fields["tunnel_address"]
        hook_run("host_tunnel_changed", host=host)
    return up


def hosts_check(now=None) -> dict[str, int]:
    """Any worker (beat, shared queue): the running and paused VMs of every host whose
    heartbeat stopped (worker or hostd, ``SANDBOX_HOST_DOWN_SECONDS``) become ``unknown``."""
    from vms.selectors import host_is_up

    now = now or timezone.now()
    counts = {"hosts_down": 0, "unknown": 0}
    for host in Host.objects.filter(is_active=True):
        if host_is_up(host, now):
            continue
        counts["hosts_down"] += 1
        for vm in VM.objects.filter(host=host, state__in=[S.RUNNING, S.PAUSED]):
            if vm_host_down(vm):
                counts["unknown"] += 1
    if counts["unknown"]:
        logger.warning("%d host(s) down: %d VM(s) now unknown", counts["hosts_down"], counts["unknown"])
        metrics.RECONCILE.labels("unknown").inc(counts["unknown"])
    return counts
