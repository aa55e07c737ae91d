"""Worker-side steps of each VM operation, registered with ``vms.operations`` (and called by
its reconciler), on the VM's host. Every step is idempotent so a redelivered task (worker
killed mid-way) finishes the job or leaves a defined state.

No step holds a transaction or the VM's row lock while it talks to the VMM: the request moved
the VM to the action's transitional state (``vms.transitions``), the step calls the VMM, then
compare-and-sets the outcome. The public helpers below (``vm_fail``, ``vm_settle``,
``vmm_kill_quietly``, ``vm_runtime_cleanup``, ``vm_before_launch``, ``vm_agent_wait``,
``vm_delete_row``) are what other apps' operations (snapshots) use.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from guardian.models import GroupObjectPermission, UserObjectPermission

from accounts.audit import audit_record
from sandbox_site.errors import ApplicationError
from vms import agent_gateway, hypervisor
from vms.events import vm_event_publish
from vms.hooks import hook_run
from vms.models import VM, Image, Operation, VmState
from vms.operations import operation_handler_register, operation_log
from vms.transitions import TRANSITIONS, vm_transition, vm_transition_done
from vms.vmm.base import Driver, RuntimeState, VmmError

logger = logging.getLogger(__name__)
S = VmState


def _driver(vm: VM, name: str | None = None) -> Driver:
    return hypervisor.driver_for(name or vm.driver or hypervisor.driver_name_select())


# --- helpers other apps' operations use -------------------------------------------------------


def vm_fail(vm: VM, message: str, *, expected) -> bool:
    """Compare-and-set ``vm`` to error, keeping ``message`` and the last console lines."""
    console = hypervisor.serial_tail(vm.pk)
    return vm_transition(vm, expected=expected, new=S.ERROR, last_error=message[:2000], last_console=console[-8000:])


def vmm_kill_quietly(vm: VM, *, driver_name: str | None = None) -> None:
    """Kill the VM's VMM at once, logging (not raising) a failure."""
    try:
        _driver(vm, driver_name).shutdown(hypervisor.vm_spec(vm), graceful_timeout=0, force=True)
    except Exception:
        logger.warning("could not kill VMM of %s", vm.pk, exc_info=True)


def vm_runtime_cleanup(vm: VM) -> None:
    """Kill any VMM, remove the runtime directory and unplumb the VM's network; logs failures."""
    try:
        _driver(vm).cleanup(hypervisor.vm_spec(vm))
    except Exception:
        logger.warning("cleanup of %s failed", vm.pk, exc_info=True)
    try:
        hook_run("vm_vmm_gone", vm=vm)
    except Exception:
        logger.warning("network clean-up of %s failed", vm.pk, exc_info=True)


def vm_before_launch(vm: VM) -> list[str]:
    """Run the hooks that must precede a VMM launch or restore (network plumbing: the VMM
    opens its TAP by name); returns lines for the operation log."""
    lines: list[str] = []
    for result in hook_run("vm_before_launch", vm=vm):
        lines.extend(result or [])
    return lines


def vm_agent_wait(op: Operation, vm: VM) -> dict:
    """Block until the guest agent answers (``SANDBOX_BOOT_TIMEOUT``); logs its version."""
    operation_log(op, "waiting for guest agent", progress=60)
    agent = agent_gateway.agent_wait(vm, timeout=settings.SANDBOX_BOOT_TIMEOUT)
    operation_log(op, f"guest agent answered (version {agent.get('agent_version', '?')})", progress=90)
    for lines in hook_run("vm_agent_ready", vm=vm):
        for line in lines or ():
            operation_log(op, line)
    return agent


def vm_settle(vm: VM, *, expected, previous: str | None, why: str) -> str | None:
    """After an in-place action (pause, resume, reboot, resize, snapshot) failed or was lost:
    put the VM in the state its VMM reports (running/paused; stopped when it was stopped
    before and still is; error when the VMM is gone). Returns the new state, or None when
    someone else moved the VM meanwhile."""
    runtime: RuntimeState | None = None
    unknown = False
    if vm.driver:
        try:
            runtime = _driver(vm).info(hypervisor.vm_spec(vm), timeout=3.0).state
        except VmmError:
            unknown = True  # the VMM does not answer: assume the action changed nothing
    if runtime == RuntimeState.RUNNING:
        new = S.RUNNING
    elif runtime == RuntimeState.PAUSED:
        new = S.PAUSED
    elif unknown:
        new = previous or S.RUNNING
    elif previous == S.STOPPED and runtime in (RuntimeState.GONE, None):
        new = S.STOPPED
    else:
        if runtime not in (RuntimeState.GONE, None):
            vmm_kill_quietly(vm)  # e.g. a guest that powered off meanwhile: nothing to keep
        status = runtime.value if runtime is not None else "unknown"
        return S.ERROR if vm_fail(vm, f"{why}; the VMM is {status}.", expected=expected) else None
    return new if vm_transition(vm, expected=expected, new=new) else None


def vm_powered_off(vm: VM, *, reason: str) -> bool:
    """The guest powered itself off while the VMM stayed up: shut the VMM down and record the
    VM as stopped, with ``reason`` in ``last_error``. False when the VM was no longer
    running or paused (someone else's operation owns it)."""
    if not vm_transition(vm, expected={S.RUNNING, S.PAUSED}, new=S.STOPPING):
        return False
    try:
        _driver(vm).shutdown(hypervisor.vm_spec(vm), graceful_timeout=0, force=True)
        hook_run("vm_vmm_gone", vm=vm)
    except Exception as exc:
        vm_fail(vm, f"The guest powered off but its VMM could not be stopped: {exc}", expected={S.STOPPING})
        return False
    return vm_transition(vm, expected={S.STOPPING}, new=S.STOPPED, vmm_pid=None, started_at=None, last_error=reason)


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
        hook_run("vm_row_deleting", vm=vm)
        VM.objects.filter(pk=vm.pk).delete()
    vm.state = S.DELETING
    vm_event_publish(vm, kind="vm.deleted")


# --- handlers ---------------------------------------------------------------------------------


def _image_ready(vm: VM) -> None:
    image = vm.boot_image
    if image.status != Image.Status.READY:
        raise ApplicationError(f"Image {image.name} is not built yet (run `manage.py build_image`).")


def vm_create_run(op: Operation, vm: VM) -> None:
    if vm.state != S.CREATING:
        # Redelivered after the VM moved on: the earlier run got this far.
        if vm.state == S.STARTING:
            vm_boot_run(op, vm)
        return
    try:
        _image_ready(vm)
        name = hypervisor.driver_name_select()
        driver = hypervisor.driver_for(name)
        spec = hypervisor.vm_spec(vm)
        operation_log(op, f"preparing disk overlay ({name})", progress=10)
        driver.prepare(spec)
    except Exception as exc:
        vm_runtime_cleanup(vm)
        vm_fail(vm, f"create failed: {getattr(exc, 'message', exc)}", expected={S.CREATING})
        raise
    VM.objects.filter(pk=vm.pk).update(driver=name)
    vm.driver = name
    if op.params.get("start", True):
        if vm_transition(vm, expected={S.CREATING}, new=S.STARTING):
            vm_boot_run(op, vm)
    else:
        vm_transition(vm, expected={S.CREATING}, new=S.STOPPED)


def vm_boot_run(op: Operation, vm: VM) -> None:
    """starting -> running once the agent answers (launching the VMM unless it already runs)."""
    if vm.state != S.STARTING:
        return
    driver = _driver(vm)
    spec = hypervisor.vm_spec(vm)
    try:
        _image_ready(vm)
        info = driver.info(spec)
        if info.state == RuntimeState.GONE:
            driver.prepare(spec)
            plumbed = vm_before_launch(vm)
            if plumbed:
                operation_log(op, "network: " + ", ".join(plumbed), progress=25)
            operation_log(op, "launching VMM", progress=30)
            result = driver.launch(spec)
            VM.objects.filter(pk=vm.pk).update(
                driver=result.driver, acceleration=result.acceleration, vmm_pid=result.pid
            )
            vm.driver, vm.acceleration, vm.vmm_pid = result.driver, result.acceleration, result.pid
            operation_log(op, f"{result.driver} started (pid {result.pid}, {result.acceleration})", progress=50)
        else:
            operation_log(op, f"VMM already running (pid {info.pid}); waiting for the guest agent", progress=50)
        vm_agent_wait(op, vm)
    except Exception as exc:
        message = getattr(exc, "message", None) or str(exc)
        operation_log(op, f"boot failed: {message}")
        if vm_fail(vm, f"boot failed: {message}", expected={S.STARTING}):
            vmm_kill_quietly(vm)  # else a newer operation (stop, delete) owns the VMM now
        raise
    if not vm_transition_done(vm, "start", started_at=timezone.now(), last_error="", last_console=""):
        # Someone stopped or deleted it while it booted; their operation owns the VMM now.
        operation_log(op, "state changed during boot; leaving it to the newer operation")


def vm_stop_run(op: Operation, vm: VM) -> None:
    if vm.state != S.STOPPING:
        return
    force = bool(op.params.get("force"))
    operation_log(
        op,
        "forcing power off" if force else f"asking the guest to power off ({settings.SANDBOX_STOP_TIMEOUT:.0f}s)",
        progress=20,
    )
    try:
        _driver(vm).shutdown(hypervisor.vm_spec(vm), graceful_timeout=settings.SANDBOX_STOP_TIMEOUT, force=force)
    except Exception as exc:
        vmm_kill_quietly(vm)
        vm_fail(vm, f"stop failed: {getattr(exc, 'message', None) or exc}", expected={S.STOPPING})
        raise
    try:
        hook_run("vm_vmm_gone", vm=vm)
    except Exception:
        logger.warning("network clean-up of %s failed", vm.pk, exc_info=True)
    vm_transition_done(vm, "stop", vmm_pid=None, started_at=None)


def in_place_handler(action: str, call):
    """Handler of an action that talks to a running VMM without replacing it: the VM is in
    the action's transitional state (set by the request) while ``call`` runs, outside any
    transaction; then the outcome is compare-and-set. Apps use it for their own in-place
    actions (networking: ``nic_hotplug``)."""

    def handler(op: Operation, vm: VM) -> None:
        rule = TRANSITIONS[action]
        if vm.state != rule.during:
            return  # done by an earlier delivery, or someone else moved the VM
        previous = op.params.get("previous_state")
        try:
            fields = call(_driver(vm), hypervisor.vm_spec(vm), op) or {}
        except Exception as exc:
            settled = vm_settle(vm, expected={rule.during}, previous=previous, why=f"{action} failed")
            operation_log(op, f"{action} failed; the VM is {settled or vm.state}")
            raise ApplicationError(f"Could not {action} the VM: {getattr(exc, 'message', None) or exc}") from exc
        if not vm_transition_done(vm, action, previous=previous, **fields):
            operation_log(op, f"state changed during {action}; leaving it to the newer operation")

    handler.__name__ = f"vm_{action}_run"
    return handler


def _resize_call(driver: Driver, spec, op: Operation) -> dict:
    vcpus, memory_mib = op.params["vcpus"], op.params["memory_mib"]
    driver.resize(spec, vcpus=vcpus, memory_mib=memory_mib)
    return {"vcpus": vcpus, "memory_mib": memory_mib}


vm_pause_run = in_place_handler("pause", lambda driver, spec, op: driver.pause(spec))
vm_resume_run = in_place_handler("resume", lambda driver, spec, op: driver.resume(spec))
vm_reboot_run = in_place_handler("reboot", lambda driver, spec, op: driver.reboot(spec))
vm_resize_run = in_place_handler("resize", _resize_call)


def vm_delete_run(op: Operation, vm: VM) -> None:
    if vm.state != S.DELETING:
        return
    operation_log(op, "stopping VMM and removing runtime files", progress=30)
    _driver(vm).cleanup(hypervisor.vm_spec(vm))
    hook_run("vm_vmm_gone", vm=vm)  # the VMM is gone: its TAP and rules can go
    vm_delete_row(vm, actor=op.requested_by)


def handlers_register() -> None:
    """Called from ``VmsConfig.ready``."""
    for action, fn in (
        ("create", vm_create_run),
        ("start", vm_boot_run),
        ("stop", vm_stop_run),
        ("reboot", vm_reboot_run),
        ("pause", vm_pause_run),
        ("resume", vm_resume_run),
        ("resize", vm_resize_run),
        ("delete", vm_delete_run),
    ):
        operation_handler_register(action, fn)
