"""Worker-side steps of each VM operation. Called only from ``services.operation_execute``
(and the reconciler), on the VM's host. Every step is idempotent so a redelivered task
(worker killed mid-way) finishes the job or leaves a defined state."""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from guardian.models import GroupObjectPermission, UserObjectPermission

from accounts.audit import audit_record
from networking.services import nic_plumb, nic_release, nic_unplumb
from sandbox_site.errors import ApplicationError, ConflictError
from vms import agent_gateway, hypervisor
from vms.events import vm_event_publish
from vms.models import VM, Image, Operation, VmState
from vms.vmm.base import RuntimeState, VmmError

logger = logging.getLogger(__name__)
S = VmState


def _log(op: Operation, line: str, progress: int | None = None) -> None:
    from vms.services import operation_log

    operation_log(op, line, progress=progress)


def _cas(vm: VM, expected, new: str, **fields) -> bool:
    from vms.services import vm_transition

    return vm_transition(vm, expected=expected, new=new, **fields)


def _fail(vm: VM, message: str, *, expected) -> None:
    console = hypervisor.serial_tail(vm.pk)
    _cas(vm, expected, S.ERROR, last_error=message[:2000], last_console=console[-8000:])


def run(op: Operation) -> None:
    vm = VM.objects.select_related("template__image", "owner").filter(pk=op.vm_id).first()
    if vm is None:
        if op.action == "delete":
            return
        raise ApplicationError("The VM no longer exists.")
    handler = _HANDLERS[op.action]
    handler(op, vm)


def register_operation_handler(action: str, fn) -> None:
    """Let another app run its own operations (e.g. snapshots registers "snapshot",
    "restore", "clone" from its AppConfig.ready): ``fn(op, vm)``, idempotent like ours."""
    existing = _HANDLERS.get(action)
    if existing is not None and existing is not fn:
        raise ValueError(f"operation {action!r} already has a handler")
    _HANDLERS[action] = fn


def _image_ready(vm: VM) -> None:
    image = vm.template.image
    if image.status != Image.Status.READY:
        raise ApplicationError(f"Image {image.name} is not built yet (run `manage.py build_image`).")


def _create(op: Operation, vm: VM) -> None:
    if vm.state != S.CREATING:
        # Redelivered after the VM moved on: the earlier run got this far.
        if vm.state == S.STARTING:
            _boot(op, vm)
        return
    try:
        _image_ready(vm)
        name = hypervisor.driver_name_select()
        driver = hypervisor.driver_for(name)
        spec = hypervisor.vm_spec(vm)
        _log(op, f"preparing disk overlay ({name})", 10)
        driver.prepare(spec)
    except Exception as exc:
        _cleanup_quietly(vm)
        _fail(vm, f"create failed: {getattr(exc, 'message', exc)}", expected={S.CREATING})
        raise
    VM.objects.filter(pk=vm.pk).update(driver=name)
    vm.driver = name
    if op.params.get("start", True):
        if _cas(vm, {S.CREATING}, S.STARTING):
            _boot(op, vm)
    else:
        _cas(vm, {S.CREATING}, S.STOPPED)


def _boot(op: Operation, vm: VM) -> None:
    if vm.state != S.STARTING:
        return
    name = vm.driver or hypervisor.driver_name_select()
    driver = hypervisor.driver_for(name)
    spec = hypervisor.vm_spec(vm)
    try:
        _image_ready(vm)
        info = driver.info(spec)
        if info.state == RuntimeState.GONE:
            driver.prepare(spec)
            plumbed = nic_plumb(vm=vm)  # the VMM opens its TAP by name: it must exist first
            if plumbed:
                _log(op, "network: " + ", ".join(f"{n.tap} {n.ip}/{n.prefix}" for n in plumbed), 25)
            _log(op, "launching VMM", 30)
            result = driver.launch(spec)
            VM.objects.filter(pk=vm.pk).update(
                driver=result.driver, acceleration=result.acceleration, vmm_pid=result.pid
            )
            _log(op, f"{result.driver} started (pid {result.pid}, {result.acceleration})", 50)
        else:
            _log(op, f"VMM already running (pid {info.pid}); waiting for the guest agent", 50)
        _log(op, "waiting for guest agent", 60)
        agent = agent_gateway.agent_wait(vm, timeout=settings.SANDBOX_BOOT_TIMEOUT)
        _log(op, f"guest agent answered (version {agent.get('agent_version', '?')})", 90)
    except Exception as exc:
        message = getattr(exc, "message", None) or str(exc)
        _log(op, f"boot failed: {message}")
        _fail(vm, f"boot failed: {message}", expected={S.STARTING})
        _kill_quietly(driver, spec)
        raise
    if not _cas(vm, {S.STARTING}, S.RUNNING, started_at=timezone.now(), last_error="", last_console=""):
        # Someone stopped or deleted it while it booted; their operation owns the VMM now.
        _log(op, "state changed during boot; leaving it to the newer operation")


def _start(op: Operation, vm: VM) -> None:
    _boot(op, vm)


def _stop(op: Operation, vm: VM) -> None:
    if vm.state != S.STOPPING:
        return
    driver = hypervisor.driver_for(vm.driver or hypervisor.driver_name_select())
    spec = hypervisor.vm_spec(vm)
    force = bool(op.params.get("force"))
    _log(
        op,
        "forcing power off" if force else f"asking the guest to power off ({settings.SANDBOX_STOP_TIMEOUT:.0f}s)",
        20,
    )
    driver.shutdown(spec, graceful_timeout=settings.SANDBOX_STOP_TIMEOUT, force=force)
    _cas(vm, {S.STOPPING}, S.STOPPED, vmm_pid=None, started_at=None)


def _simple(action: str, expected: str, new: str):
    def handler(op: Operation, vm: VM) -> None:
        with transaction.atomic():
            locked = VM.objects.select_for_update().get(pk=vm.pk)
            if locked.state != expected:
                raise ConflictError(f"Cannot {action} a VM that is {locked.state}.")
            driver = hypervisor.driver_for(locked.driver)
            getattr(driver, action)(hypervisor.vm_spec(locked))
            if new != locked.state:
                VM.objects.filter(pk=locked.pk).update(state=new, updated_at=timezone.now())
        vm.refresh_from_db()
        vm_event_publish(vm)

    return handler


def _resize(op: Operation, vm: VM) -> None:
    vcpus, memory_mib = op.params["vcpus"], op.params["memory_mib"]
    with transaction.atomic():
        locked = VM.objects.select_for_update().get(pk=vm.pk)
        driver = hypervisor.driver_for(locked.driver)
        driver.resize(hypervisor.vm_spec(locked), vcpus=vcpus, memory_mib=memory_mib)
        VM.objects.filter(pk=locked.pk).update(vcpus=vcpus, memory_mib=memory_mib)
    vm.refresh_from_db()
    vm_event_publish(vm)


def _delete(op: Operation, vm: VM) -> None:
    if vm.state != S.DELETING:
        return
    _log(op, "stopping VMM and removing runtime files", 30)
    name = vm.driver or hypervisor.driver_name_select()
    hypervisor.driver_for(name).cleanup(hypervisor.vm_spec(vm))
    nic_unplumb(vm=vm)  # the VMM is gone: its TAP and rules can go
    vm_delete_row(vm, actor=op.requested_by)


def vm_delete_row(vm: VM, *, actor) -> None:
    """Remove the row and its object permissions (guardian's generic rows do not cascade)."""
    with transaction.atomic():
        UserObjectPermission.objects.filter(
            content_type__app_label="vms", content_type__model="vm", object_pk=str(vm.pk)
        ).delete()
        GroupObjectPermission.objects.filter(
            content_type__app_label="vms", content_type__model="vm", object_pk=str(vm.pk)
        ).delete()
        audit_record(actor=actor, action="vm.deleted", obj=vm, before={"state": vm.state})
        Operation.objects.filter(vm=vm).update(vm=None)
        nic_release(vm=vm, actor=None)
        VM.objects.filter(pk=vm.pk).delete()
    vm.state = S.DELETING
    vm_event_publish(vm, kind="vm.deleted")


def _kill_quietly(driver, spec) -> None:
    try:
        driver.shutdown(spec, graceful_timeout=0, force=True)
    except Exception:
        logger.warning("could not kill VMM of %s", spec.vm_id, exc_info=True)


def _cleanup_quietly(vm: VM) -> None:
    try:
        hypervisor.driver_for(vm.driver or hypervisor.driver_name_select()).cleanup(hypervisor.vm_spec(vm))
    except Exception:
        logger.warning("cleanup of %s failed", vm.pk, exc_info=True)
    try:
        nic_unplumb(vm=vm)
    except Exception:
        logger.warning("network clean-up of %s failed", vm.pk, exc_info=True)


_HANDLERS = {
    "create": _create,
    "start": _start,
    "stop": _stop,
    "reboot": _simple("reboot", S.RUNNING, S.RUNNING),
    "pause": _simple("pause", S.RUNNING, S.PAUSED),
    "resume": _simple("resume", S.PAUSED, S.RUNNING),
    "resize": _resize,
    "delete": _delete,
}


# --- reconciliation ---------------------------------------------------------------------

MAX_ATTEMPTS = 3


def _settle_transitional(vm: VM, now) -> int:
    """A VM in a transitional state belongs to its live operation. When that operation's
    worker died, re-enqueue it (it is idempotent) up to MAX_ATTEMPTS, then give up: stop the
    VMM and mark the VM error. Returns 1 when something had to be done."""
    from vms.services import _operation_enqueue, operation_worker_alive

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
        if (now - (live.started_at or live.created_at)).total_seconds() < limit:
            return 0
    if live is not None and live.attempts < MAX_ATTEMPTS and live.status == Operation.Status.RUNNING:
        if Operation.objects.filter(pk=live.pk, status=Operation.Status.RUNNING, worker=live.worker).update(
            status=Operation.Status.PENDING
        ):
            _log(live, f"worker {live.worker} was lost; retrying (attempt {live.attempts + 1})")
            _operation_enqueue(live, vm)
        return 1
    if live is not None:
        Operation.objects.filter(pk=live.pk).update(
            status=Operation.Status.FAILED, error="The worker running this operation was lost.", finished_at=now
        )
    if vm.driver:
        _kill_quietly(hypervisor.driver_for(vm.driver), hypervisor.vm_spec(vm))
    _fail(vm, f"Operation lost while {vm.state}; the VMM was stopped.", expected={vm.state})
    return 1


STUCK_GRACE_SECONDS = 60
PENDING_LIMIT_SECONDS = 3600


def vms_reconcile(host) -> dict[str, int]:
    """Compare recorded state with what runs on this host: a dead VMM turns its VM to error
    (keeping the last console lines); a transitional state whose operation died is settled;
    runtime directories of VMs that no longer exist are removed."""
    counts = {"died": 0, "stuck": 0, "orphans": 0}
    now = timezone.now()
    for vm in VM.objects.filter(host=host).select_related("template__image"):
        if vm.state in (S.RUNNING, S.PAUSED) and vm.driver:
            try:
                info = hypervisor.driver_for(vm.driver).info(hypervisor.vm_spec(vm), timeout=3.0)
            except VmmError:
                continue
            if info.state == RuntimeState.GONE:
                _fail(vm, "The VMM process exited unexpectedly.", expected={vm.state})
                counts["died"] += 1
        elif vm.state in (S.STARTING, S.STOPPING, S.CREATING, S.DELETING):
            counts["stuck"] += _settle_transitional(vm, now)
    root = settings.SANDBOX_RUNTIME_DIR
    if root.is_dir():
        known = {str(pk) for pk in VM.objects.values_list("pk", flat=True)}
        for entry in root.iterdir():
            if entry.is_dir() and entry.name not in known and len(entry.name) == 36:
                from vms.vmm.base import VmSpec

                orphan = VmSpec(vm_id=entry.name, runtime_dir=entry, kernel=entry, base_image=entry)
                for name in ("qemu", "cloud-hypervisor"):
                    try:
                        hypervisor.driver_for(name).cleanup(orphan)
                    except Exception:
                        logger.warning("orphan cleanup of %s failed", entry, exc_info=True)
                counts["orphans"] += 1
    from vms.models import Host

    Host.objects.filter(pk=host.pk).update(last_seen_at=now)
    return counts
