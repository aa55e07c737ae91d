"""VM lifecycle: the business rules. Views and tasks call these and nothing else.

Every state change goes through ``TRANSITIONS`` and a compare-and-set update
(``filter(pk=.., state__in=allowed).update(...)``; zero rows means someone else won).
Slow work runs in Celery tasks on the VM's host queue; each action is an ``Operation``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import F
from django.utils import timezone
from guardian.shortcuts import assign_perm

from accounts.audit import audit_record
from accounts.models import AuditResult
from accounts.permissions import require_perm
from networking.services import nic_allocate
from sandbox_site.errors import ApplicationError, ConflictError, QuotaExceeded
from vms import selectors
from vms.events import vm_event_publish
from vms.host_disk import require_disk_space
from vms.models import VM, Host, Image, Operation, Template, VmState

logger = logging.getLogger(__name__)

S = VmState


@dataclass(frozen=True)
class Transition:
    allowed_from: frozenset[str]
    during: str | None  # state while the operation runs (set at request time, CAS)


TRANSITIONS: dict[str, Transition] = {
    "create": Transition(frozenset({S.CREATING}), None),
    "start": Transition(frozenset({S.STOPPED, S.ERROR}), S.STARTING),
    "stop": Transition(frozenset({S.RUNNING, S.PAUSED, S.STARTING, S.ERROR}), S.STOPPING),
    "reboot": Transition(frozenset({S.RUNNING}), None),
    "pause": Transition(frozenset({S.RUNNING}), None),
    "resume": Transition(frozenset({S.PAUSED}), None),
    "resize": Transition(frozenset({S.STOPPED, S.RUNNING, S.PAUSED}), None),
    "delete": Transition(frozenset(set(S.values) - {S.DELETING}), S.DELETING),
    # --- snapshots app (snapshots/services.py) ---
    # A snapshot leaves the VM's state alone (the worker locks the row while it pauses it).
    "snapshot": Transition(frozenset({S.RUNNING, S.PAUSED, S.STOPPED}), None),
    # Restoring replaces the running VMM: the VM is "starting" until the agent answers.
    "restore": Transition(frozenset({S.RUNNING, S.PAUSED, S.STOPPED, S.ERROR}), S.STARTING),
}

ACTION_PERMS = {
    "start": "vms.power_vm",
    "stop": "vms.power_vm",
    "reboot": "vms.power_vm",
    "pause": "vms.power_vm",
    "resume": "vms.power_vm",
    "resize": "vms.change_vm",
    "delete": "vms.delete_vm",
}


def vm_state_cas(vm_id, *, expected: set[str] | frozenset[str], new: str, **fields) -> bool:
    """Compare-and-set the state; True when this caller won."""
    updated = VM.objects.filter(pk=vm_id, state__in=list(expected)).update(
        state=new, updated_at=timezone.now(), **fields
    )
    return updated == 1


def vm_transition(vm: VM, *, expected, new: str, **fields) -> bool:
    """Compare-and-set the state, refresh ``vm`` and tell dashboards; True when this caller won."""
    won = vm_state_cas(vm.pk, expected=expected, new=new, **fields)
    if won:
        vm.refresh_from_db()
        vm_event_publish(vm)
    return won


def _require(actor, perm: str, vm: VM, action: str) -> None:
    require_perm(actor, perm, vm, action=f"vm.{action}")


def _snapshot(vm: VM) -> dict:
    return {"state": vm.state, "vcpus": vm.vcpus, "memory_mib": vm.memory_mib, "disk_gib": vm.disk_gib}


def local_host() -> Host:
    from django.conf import settings

    host, _ = Host.objects.get_or_create(name=settings.SANDBOX_HOST_NAME)
    return host


def _check_limits(*, owner, template: Template, vcpus: int, memory_mib: int, disk_gib: int, exclude_vm_id=None) -> None:
    errors = {}
    if not 1 <= vcpus <= template.max_vcpus:
        errors["vcpus"] = f"must be between 1 and {template.max_vcpus} for template {template.name}"
    if not 64 <= memory_mib <= template.max_memory_mib:
        errors["memory_mib"] = f"must be between 64 and {template.max_memory_mib} for template {template.name}"
    if not template.disk_gib <= disk_gib <= template.max_disk_gib:
        errors["disk_gib"] = f"must be between {template.disk_gib} and {template.max_disk_gib}"
    if errors:
        raise ApplicationError("VM size is outside the template's limits.", details=errors)
    quota = selectors.quota_for(owner)
    usage = selectors.usage_of(owner, exclude_vm_id=exclude_vm_id)
    over = {}
    if exclude_vm_id is None and usage["vms"] + 1 > quota["max_vms"]:
        over["vms"] = f"{usage['vms']} of {quota['max_vms']} VMs used"
    for key, asked in (("vcpus", vcpus), ("memory_mib", memory_mib), ("disk_gib", disk_gib)):
        if usage[key] + asked > quota[f"max_{key}"]:
            over[key] = f"{usage[key]} used + {asked} asked > limit {quota[f'max_{key}']}"
    if over:
        raise QuotaExceeded("This would exceed your resource limits.", details=over)


def _operation_enqueue(op: Operation, vm: VM) -> None:
    from vms.tasks import operation_run_task

    queue = vm.host.queue if vm.host_id else "shared"
    transaction.on_commit(lambda: operation_run_task.apply_async(args=[str(op.pk)], queue=queue))


def _operation_new(*, vm: VM, action: str, actor, params: dict | None = None) -> Operation:
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


def vm_create(
    *,
    owner,
    name: str,
    template: Template,
    vcpus: int | None = None,
    memory_mib: int | None = None,
    disk_gib: int | None = None,
    metadata: dict | None = None,
    start: bool = True,
    actor,
) -> tuple[VM, Operation]:
    """Record the VM (creating), grant the owner every object permission, and enqueue the
    create (+ boot) operation on the host's queue once the transaction commits."""
    require_perm(actor, "vms.add_vm", None, action="vm.create", message="Your role may not create VMs.")
    require_disk_space(action="create a VM")
    if not template.is_active:
        raise ApplicationError("This template is not available.", details={"template": "inactive"})
    vcpus = vcpus or template.vcpus
    memory_mib = memory_mib or template.memory_mib
    disk_gib = disk_gib or template.disk_gib
    if metadata is not None and (not isinstance(metadata, dict) or len(str(metadata)) > 16384):
        raise ApplicationError("metadata must be an object of at most 16 KiB.")
    with transaction.atomic():
        # Serialise creates per owner so two concurrent requests cannot both pass the quota check.
        get_user_model().objects.select_for_update().get(pk=owner.pk)
        _check_limits(owner=owner, template=template, vcpus=vcpus, memory_mib=memory_mib, disk_gib=disk_gib)
        if VM.objects.filter(owner=owner, name=name).exists():
            raise ConflictError(f"You already have a VM named {name!r}.", details={"name": "taken"})
        vm = VM(
            name=name,
            owner=owner,
            template=template,
            host=local_host(),
            vcpus=vcpus,
            memory_mib=memory_mib,
            disk_gib=disk_gib,
            metadata=metadata or {},
        )
        vm.full_clean()
        vm.save()
        for codename in VM.object_permission_codenames():
            assign_perm(f"vms.{codename}", owner, vm)
        if settings.SANDBOX_NETWORKING:
            # In this transaction: the address is taken exactly when the VM exists.
            nic_allocate(vm=vm, network=None, actor=actor)
        op = _operation_new(vm=vm, action="create", actor=actor, params={"start": start})
        audit_record(
            actor=actor, action="vm.create", obj=vm, after={**_snapshot(vm), "name": name, "template": template.name}
        )
        _operation_enqueue(op, vm)
    return vm, op


def vm_action(*, vm: VM, action: str, actor, force: bool = False) -> Operation:
    """start / stop / reboot / pause / resume / delete: check, CAS to the transitional state,
    record an operation and enqueue it."""
    if action not in ACTION_PERMS:
        raise ApplicationError(f"Unknown action {action!r}.")
    _require(actor, ACTION_PERMS[action], vm, action)
    if action == "start":
        require_disk_space(action="start a VM")
    rule = TRANSITIONS[action]
    with transaction.atomic():
        before = _snapshot(vm)
        if rule.during is not None:
            won = vm_state_cas(vm.pk, expected=rule.allowed_from, new=rule.during)
        else:
            won = VM.objects.filter(pk=vm.pk, state__in=list(rule.allowed_from)).exists()
        if not won:
            vm.refresh_from_db()
            raise ConflictError(
                f"Cannot {action} a VM that is {vm.state}.",
                details={"state": vm.state, "allowed_from": sorted(rule.allowed_from)},
            )
        vm.refresh_from_db()
        op = _operation_new(vm=vm, action=action, actor=actor, params={"force": force})
        audit_record(
            actor=actor, action=f"vm.{action}", obj=vm, before=before, after={"operation": str(op.pk), "force": force}
        )
        _operation_enqueue(op, vm)
        transaction.on_commit(lambda: vm_event_publish(vm))
    return op


def vm_resize(*, vm: VM, actor, vcpus: int | None = None, memory_mib: int | None = None) -> VM | Operation:
    """Change vcpus/memory. A stopped VM takes the new size at its next start; a running VM
    needs a driver with hotplug (cloud-hypervisor), otherwise 409 says a restart is needed."""
    from vms.hypervisor import driver_capabilities

    _require(actor, ACTION_PERMS["resize"], vm, "resize")
    vcpus = vcpus or vm.vcpus
    memory_mib = memory_mib or vm.memory_mib
    if vcpus == vm.vcpus and memory_mib == vm.memory_mib:
        return vm
    _check_limits(
        owner=vm.owner,
        template=vm.template,
        vcpus=vcpus,
        memory_mib=memory_mib,
        disk_gib=vm.disk_gib,
        exclude_vm_id=vm.pk,
    )
    with transaction.atomic():
        locked = VM.objects.select_for_update().get(pk=vm.pk)
        before = _snapshot(locked)
        if locked.state == S.STOPPED:
            locked.vcpus, locked.memory_mib = vcpus, memory_mib
            locked.save(update_fields=["vcpus", "memory_mib", "updated_at"])
            audit_record(actor=actor, action="vm.resize", obj=locked, before=before, after=_snapshot(locked))
            return locked
        if locked.state not in (S.RUNNING, S.PAUSED):
            raise ConflictError(f"Cannot resize a VM that is {locked.state}.")
        if not driver_capabilities(locked.driver).live_resize:
            raise ConflictError(
                f"The {locked.driver or 'current'} driver cannot hotplug CPUs or memory: "
                "stop the VM, resize, then start it.",
                code="restart_required",
            )
        op = _operation_new(vm=locked, action="resize", actor=actor, params={"vcpus": vcpus, "memory_mib": memory_mib})
        audit_record(
            actor=actor, action="vm.resize", obj=locked, before=before, after={"vcpus": vcpus, "memory_mib": memory_mib}
        )
        _operation_enqueue(op, locked)
    return op


def vm_update(*, vm: VM, actor, name: str | None = None, metadata: dict | None = None) -> VM:
    _require(actor, "vms.change_vm", vm, "update")
    with transaction.atomic():
        locked = VM.objects.select_for_update().get(pk=vm.pk)
        before = {"name": locked.name, "metadata": locked.metadata}
        if name is not None:
            locked.name = name
        if metadata is not None:
            if not isinstance(metadata, dict) or len(str(metadata)) > 16384:
                raise ApplicationError("metadata must be an object of at most 16 KiB.")
            locked.metadata = metadata
        locked.full_clean()
        if VM.objects.filter(owner=locked.owner, name=locked.name).exclude(pk=locked.pk).exists():
            raise ConflictError(f"You already have a VM named {locked.name!r}.")
        locked.save()
        audit_record(
            actor=actor,
            action="vm.update",
            obj=locked,
            before=before,
            after={"name": locked.name, "metadata": locked.metadata},
        )
    return locked


def vm_agent_ping(*, vm: VM) -> dict:
    """Ask the guest agent for its version, boot id and uptime."""
    from vms import agent_gateway

    if vm.state != S.RUNNING:
        raise ConflictError(f"The VM is {vm.state}; the agent answers only while it runs.")
    return agent_gateway.agent_ping(vm, timeout=5.0)


# --- operation execution (runs in Celery workers on the VM's host) --------------------


def operation_log(op: Operation, line: str, *, progress: int | None = None) -> None:
    """Append a line to the operation log, keeping at most Operation.LOG_LIMIT characters."""
    stamp = timezone.now().strftime("%H:%M:%S")
    text = (op.log + f"{stamp} {line}\n")[-Operation.LOG_LIMIT :]
    op.log = text
    fields = {"log": text}
    if progress is not None:
        op.progress = progress
        fields["progress"] = progress
    Operation.objects.filter(pk=op.pk).update(**fields)


def operation_worker_id() -> str:
    from django.conf import settings

    return f"{settings.SANDBOX_HOST_NAME}:{os.getpid()}"


def operation_worker_alive(worker: str) -> bool:
    """Whether the worker process that claimed an operation still runs. Workers of other
    hosts are assumed alive: only their own host can tell."""
    from django.conf import settings

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


def operation_execute(op_id) -> Operation | None:
    """Run one operation; idempotent (a redelivered task resumes or finishes cleanly)."""
    from vms import lifecycle

    op = Operation.objects.filter(pk=op_id).first()
    if op is None or not operation_claim(op):
        return op
    op.refresh_from_db()
    try:
        lifecycle.run(op)
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
    return op


def image_build_default(*, progress) -> Image:
    """Build the default Linux image (cached by a hash of its inputs) and record its paths."""
    from django.conf import settings

    from vms.vmm.image import build_image

    image, _ = Image.objects.get_or_create(name="linux-default")
    try:
        artifacts = build_image(settings.SANDBOX_IMAGE_DIR, progress=progress)
    except Exception:
        Image.objects.filter(pk=image.pk).update(status=Image.Status.FAILED)
        raise
    size = sum(p.stat().st_blocks * 512 for p in (artifacts.kernel, artifacts.initramfs, artifacts.rootfs))
    changed = image.digest != artifacts.digest or image.status != Image.Status.READY
    image.kernel_path = str(artifacts.kernel)
    image.initramfs_path = str(artifacts.initramfs)
    image.rootfs_path = str(artifacts.rootfs)
    image.digest = artifacts.digest
    image.size_bytes = size
    image.status = Image.Status.READY
    image.save()
    if changed:
        audit_record(
            actor=None, action="image.build", obj=image, after={"digest": artifacts.digest, "size_bytes": size}
        )
    return image
