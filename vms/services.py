"""VM lifecycle: the business rules. Views and tasks call these and nothing else.

Every state change goes through the one table and compare-and-set of ``vms.transitions``
(zero rows updated means someone else won: 409). Slow work runs in Celery tasks on the VM's
host queue; each action is an ``Operation`` (``vms.operations``), run by ``vms.lifecycle``.
"""

from __future__ import annotations

import logging
import uuid

from django.conf import settings
from django.db import transaction
from guardian.shortcuts import assign_perm

from accounts.audit import audit_record
from accounts.permissions import require_perm
from accounts.selectors import quota_of_project
from accounts.services import owner_quota_lock, project_for_create, project_personal_ensure, project_quota_lock
from sandbox_site import metrics
from sandbox_site.errors import ApplicationError, ConflictError, QuotaExceeded
from vms import selectors
from vms.admission import host_admission_check, host_room, vm_claim_mib  # noqa: F401 - for snapshots
from vms.hooks import hook_first, hook_run
from vms.host_disk import require_disk_space
from vms.models import VM, Host, Image, Operation, Template, VmState
from vms.operations import (  # noqa: F401 - re-exported for callers of the old names
    operation_claim,
    operation_enqueue,
    operation_execute,
    operation_log,
    operation_new,
    operation_worker_alive,
    operation_worker_id,
)
from vms.placement import host_pin_resolve, vm_place
from vms.transitions import (  # noqa: F401 - TRANSITIONS, vm_transition re-exported
    TRANSITIONS,
    vm_guest_running,
    vm_transition,
    vm_transition_request,
)

logger = logging.getLogger(__name__)

S = VmState

ACTION_PERMS = {action: rule.perm for action, rule in TRANSITIONS.items() if rule.perm}


def _require(actor, perm: str, vm: VM, action: str) -> None:
    require_perm(actor, perm, vm, action=f"vm.{action}")


def _snapshot(vm: VM) -> dict:
    return {"state": vm.state, "vcpus": vm.vcpus, "memory_mib": vm.memory_mib, "disk_gib": vm.disk_gib}


SYSTEM_USERNAME = "msbx-system"


def system_user():
    """The account that owns golden-snapshot builders and warm-pool VMs until a create takes
    one. It never signs in (inactive, no usable password) and holds no role."""
    from django.contrib.auth import get_user_model

    user, created = get_user_model().objects.get_or_create(username=SYSTEM_USERNAME, defaults={"is_active": False})
    if created:
        user.set_unusable_password()
        user.save(update_fields=["password"])
    return user


def system_vm_new(*, purpose: str, template: Template, host: Host, size, driver: str = "", metadata: dict) -> VM:
    """In the caller's transaction: a VM row of the system account (a golden-snapshot builder or
    a warm-pool VM) named ``<purpose>-<random>``, of ``size``'s vcpus/memory/disk, with the
    permissions and hooks of any new VM (its own NIC, MAC and address)."""
    owner = system_user()
    vm = VM(
        name=f"{purpose}-{uuid.uuid4().hex[:12]}",
        owner=owner,
        project=project_personal_ensure(owner),
        template=template,
        host=host,
        vcpus=size.vcpus,
        memory_mib=size.memory_mib,
        disk_gib=size.disk_gib,
        driver=driver,
        purpose=purpose,
        metadata=metadata,
    )
    vm.full_clean()
    vm.save()
    vm_row_init(vm=vm, actor=None)
    return vm


def local_host() -> Host:
    host, _ = Host.objects.get_or_create(name=settings.SANDBOX_HOST_NAME)
    return host


def vm_limits_check(
    *, owner, template: Template, vcpus: int, memory_mib: int, disk_gib: int, exclude_vm_id=None, project=None
) -> None:
    """Refuse a VM of this size outside the template's limits (400), or over the quota of its
    creator ``owner`` or of its ``project`` (403 ``quota_exceeded``). Call it under
    ``quota_locks(project, owner)``."""
    errors = {}
    if not 1 <= vcpus <= template.max_vcpus:
        errors["vcpus"] = f"must be between 1 and {template.max_vcpus} for template {template.name}"
    if not 64 <= memory_mib <= template.max_memory_mib:
        errors["memory_mib"] = f"must be between 64 and {template.max_memory_mib} for template {template.name}"
    if not template.disk_gib <= disk_gib <= template.max_disk_gib:
        errors["disk_gib"] = f"must be between {template.disk_gib} and {template.max_disk_gib}"
    if errors:
        raise ApplicationError("VM size is outside the template's limits.", details=errors)
    budgets = [("", selectors.quota_for(owner), selectors.usage_of(owner, exclude_vm_id=exclude_vm_id))]
    if project is not None:
        budgets.append(
            (
                "project ",
                quota_of_project(project),
                selectors.usage_of_project(project, exclude_vm_id=exclude_vm_id),
            )
        )
    for label, quota, usage in budgets:
        over = {}
        if exclude_vm_id is None and usage["vms"] + 1 > quota["max_vms"]:
            over["vms"] = f"{label}{usage['vms']} of {quota['max_vms']} VMs used"
        # The VM's console log is counted with its disk (usage leaves this VM out in both cases).
        disk = disk_gib + selectors.console_logs_gib(usage["vms"] + 1) - selectors.console_logs_gib(usage["vms"])
        for key, asked in (("vcpus", vcpus), ("memory_mib", memory_mib), ("disk_gib", disk)):
            if usage[key] + asked > quota[f"max_{key}"]:
                over[key] = f"{label}{usage[key]} used + {asked} asked > limit {quota[f'max_{key}']}"
        if over:
            for resource in over:
                metrics.QUOTA_DENIALS.labels(resource).inc()
            whose = "the project's shared" if label else "your"
            raise QuotaExceeded(f"This would exceed {whose} resource limits.", details=over)


def quota_locks(project, owner) -> None:
    """The quota locks of a write that counts against ``project``'s and ``owner``'s budgets, in
    the one lock order: project quota lock -> owner quota lock (-> host row -> VM rows)."""
    if project is not None:
        project_quota_lock(project)
    owner_quota_lock(owner)


def vm_row_init(*, vm: VM, actor, nics: list[dict] | None = None) -> None:
    """In the transaction that created ``vm`` (create, clone): grant its owner every object
    permission and run the ``vm_created`` hooks (e.g. networking takes its addresses now, so
    they exist exactly when the VM does; ``nics``: the NICs asked for, None = the default)."""
    vm_row_permissions_grant(vm=vm)
    hook_run("vm_created", vm=vm, actor=actor, nics=nics)


def vm_row_permissions_grant(*, vm: VM) -> None:
    """Give ``vm``'s owner every object permission on it (a new row, or a pool VM just taken)
    when it is in the owner's personal project. In a team project the creator's rights come
    from their project role alone, so a member made a viewer, or removed, loses them."""
    if vm.project.personal_of_id is None:
        return
    for codename in VM.object_permission_codenames():
        assign_perm(f"vms.{codename}", vm.owner, vm)


def template_image_refusal(template: Template) -> str | None:
    """Why a new VM cannot boot ``template``'s own image ("has no disk yet", "is deprecated"),
    or None when it can. A VM that picks another image does not need it."""
    image = template.image
    if image.status == Image.Status.MISSING:
        return "has no disk yet"
    if image.deprecated_at is not None:
        return "is deprecated"
    return None


def image_minimums_check(*, image: Image | None, template: Template, memory_mib: int, disk_gib: int, actor) -> None:
    """The image a new VM boots must be usable (``vms.images.image_usable_check`` for a picked
    one; a template's must have a disk and not be deprecated) and fit its minimum sizes."""
    from vms.images import image_usable_check

    boot = image or template.image
    if image is not None:
        image_usable_check(image=image, actor=actor)
    elif (reason := template_image_refusal(template)) is not None:
        raise ConflictError(f"The template's image {boot.name} {reason}.", details={"image": boot.name})
    if memory_mib < boot.min_memory_mib or disk_gib < boot.min_disk_gib:
        raise ApplicationError(
            f"Image {boot.name} needs {boot.min_memory_mib} MiB of memory and {boot.min_disk_gib} GiB of disk.",
            details={"min_memory_mib": boot.min_memory_mib, "min_disk_gib": boot.min_disk_gib},
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
    image: Image | None = None,
    host: str | None = None,
    anti_affinity: bool = False,
    project=None,
    nics: list[dict] | None = None,
    actor,
) -> tuple[VM, Operation]:
    """Record the VM (creating), grant the owner every object permission, and enqueue the
    create (+ boot) operation on the host's queue once the transaction commits. ``image``
    (any image the actor may see, ready and not deprecated) replaces the template's. The VM
    goes into ``project`` (``accounts.services.project_for_create``: default the token's
    project or the owner's personal one) and counts against its quota and the owner's. The
    host is placed (``vms.placement``): an operator may pin one by name; ``anti_affinity``
    keeps it off the hosts holding the owner's other VMs. ``nics`` (``[{"network", "ip"?,
    "ip6"?}, ...]``, checked by the networking hook) replaces the one NIC on the default
    network; such a VM is cold booted (warm-pool VMs and golden snapshots have the default NIC)."""
    require_perm(actor, "vms.add_vm", None, action="vm.create", message="Your role may not create VMs.")
    project = project_for_create(actor=actor, owner=owner, project=project, action="vm.create")
    pin = host_pin_resolve(name=host, actor=actor)
    require_disk_space(action="create a VM")
    if not template.is_active:
        raise ApplicationError("This template is not available.", details={"template": "inactive"})
    if project.templates.exists() and not project.templates.filter(pk=template.pk).exists():
        raise ApplicationError(
            f"Project {project.slug} may not use template {template.name}.",
            details={"template": "not allowed in this project"},
        )
    vcpus = vcpus or template.vcpus
    memory_mib = memory_mib or template.memory_mib
    disk_gib = disk_gib or template.disk_gib
    image_minimums_check(image=image, template=template, memory_mib=memory_mib, disk_gib=disk_gib, actor=actor)
    if metadata is not None and (not isinstance(metadata, dict) or len(str(metadata)) > 16384):
        raise ApplicationError("metadata must be an object of at most 16 KiB.")
    if nics is not None:
        # Refused before the transaction, so that a refusal's audit row is kept (checked again
        # when the NICs are allocated in it).
        hook_run("vm_nics_check", actor=actor, nics=nics)
    with transaction.atomic():
        quota_locks(project, owner)  # then check: concurrent requests cannot both pass the quota check
        vm_limits_check(
            owner=owner, project=project, template=template, vcpus=vcpus, memory_mib=memory_mib, disk_gib=disk_gib
        )
        if VM.objects.filter(owner=owner, name=name).exists():
            raise ConflictError(f"You already have a VM named {name!r}.", details={"name": "taken"})
        # A paused VM of the template's warm pool (snapshots app), when one fits and is ready
        # (a pinned or anti-affine create is placed instead; a VM asking for its own NICs is
        # not taken: pool VMs have the default one).
        taken = (
            None
            if pin is not None or anti_affinity or nics is not None
            else hook_first(
                "vm_pool_take",
                owner=owner,
                project=project,
                vm_name=name,
                template=template,
                image=image,
                vcpus=vcpus,
                memory_mib=memory_mib,
                disk_gib=disk_gib,
                metadata=metadata,
                start=start,
                actor=actor,
            )
        )
        if taken is not None:
            vm, op = taken
            audit_record(
                actor=actor,
                action="vm.create",
                obj=vm,
                after={**_snapshot(vm), "name": name, "template": template.name, "from_pool": True},
            )
            return vm, op
        placed = vm_place(
            owner=owner,
            vcpus=vcpus,
            memory_mib=memory_mib,
            start=start,
            pin=pin,
            anti_affinity=anti_affinity,
            image=image or template.image,
            template=template,
        )
        vm = VM(
            name=name,
            owner=owner,
            project=project,
            template=template,
            image=image,
            host=placed,
            vcpus=vcpus,
            memory_mib=memory_mib,
            disk_gib=disk_gib,
            metadata=metadata or {},
        )
        vm.full_clean()
        vm.save()
        vm_row_init(vm=vm, actor=actor, nics=nics)
        # A golden snapshot of the template (snapshots app) replaces the cold boot.
        golden = hook_first("vm_create_source", vm=vm, start=start) if nics is None else None
        action, params = golden or ("create", {"start": start})
        op = operation_new(vm=vm, action=action, actor=actor, params=params)
        audit_record(
            actor=actor,
            action="vm.create",
            obj=vm,
            after={**_snapshot(vm), "name": name, "template": template.name, "host": placed.name},
        )
        operation_enqueue(op, vm)
    return vm, op


def vm_action(*, vm: VM, action: str, actor, force: bool = False) -> Operation:
    """start / stop / reboot / pause / resume / delete: check, compare-and-set to the action's
    transitional state (409 when another request won), record an operation and enqueue it."""
    if action not in ACTION_PERMS or action == "resize":
        raise ApplicationError(f"Unknown action {action!r}.")
    _require(actor, ACTION_PERMS[action], vm, action)
    if action == "start":
        require_disk_space(action="start a VM")
    with transaction.atomic():
        before = _snapshot(vm)
        if action == "start":
            host_admission_check(host=vm.host or local_host(), vcpus=vm.vcpus, memory_mib=vm.memory_mib, vm=vm)
        previous = vm_transition_request(vm, action)
        op = operation_new(vm=vm, action=action, actor=actor, params={"force": force, "previous_state": previous})
        audit_record(
            actor=actor,
            action=f"vm.{action}",
            obj=vm,
            before={**before, "state": previous},
            after={"operation": str(op.pk), "force": force},
        )
        operation_enqueue(op, vm)
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
    with transaction.atomic():
        # Checked under the owner's quota lock, against usage that includes every other
        # resize that committed first (parallel resizes cannot all fit into the same room).
        quota_locks(vm.project, vm.owner)
        vm_limits_check(
            owner=vm.owner,
            project=vm.project,
            template=vm.template,
            vcpus=vcpus,
            memory_mib=memory_mib,
            disk_gib=vm.disk_gib,
            exclude_vm_id=vm.pk,
        )
        before = _snapshot(vm)
        # A stopped VM: the new size is only a row change (compare-and-set on "stopped").
        if vm_transition(vm, expected={S.STOPPED}, new=S.STOPPED, vcpus=vcpus, memory_mib=memory_mib):
            audit_record(actor=actor, action="vm.resize", obj=vm, before=before, after=_snapshot(vm))
            return vm
        vm.refresh_from_db()
        if vm.state in TRANSITIONS["resize"].allowed_from and not driver_capabilities(vm.driver).live_resize:
            raise ConflictError(
                f"The {vm.driver or 'current'} driver cannot hotplug CPUs or memory: "
                "stop the VM, resize, then start it.",
                code="restart_required",
            )
        host_admission_check(host=vm.host or local_host(), vcpus=vcpus, memory_mib=memory_mib, vm=vm)
        previous = vm_transition_request(vm, "resize")
        op = operation_new(
            vm=vm,
            action="resize",
            actor=actor,
            params={"vcpus": vcpus, "memory_mib": memory_mib, "previous_state": previous},
        )
        audit_record(
            actor=actor, action="vm.resize", obj=vm, before=before, after={"vcpus": vcpus, "memory_mib": memory_mib}
        )
        operation_enqueue(op, vm)
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

    if not vm_guest_running(vm):
        raise ConflictError(f"The VM is {vm.state}; the agent answers only while it runs.")
    return agent_gateway.agent_ping(vm, timeout=5.0)


def image_build_default(*, progress) -> Image:
    """Build the default Linux image (cached by a hash of its inputs) and record its paths."""
    from vms.inventory import image_file_sha256_record
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
    if changed or not image.file_sha256:
        # The canonical hashes other hosts' copies are checked against (vms.inventory); a
        # cached build keeps the recorded ones.
        image_file_sha256_record(image)
    if changed:
        audit_record(
            actor=None,
            action="image.build",
            obj=image,
            after={"digest": artifacts.digest, "size_bytes": size, "sha256": image.file_sha256},
        )
    return image


def image_build_uefi(*, progress) -> Image:
    """Build the UEFI Linux image (GPT disk booted by firmware; cached like the default one),
    record it as ``linux-uefi`` and give it a ``linux-uefi`` template."""
    import json

    from vms.vmm.image_uefi import build_uefi_image

    image, _ = Image.objects.get_or_create(
        name="linux-uefi",
        defaults={
            "boot_mode": "uefi",
            "description": "Debian 12 with systemd, booted by UEFI firmware (GRUB on an ESP)",
        },
    )
    try:
        artifacts = build_uefi_image(settings.SANDBOX_IMAGE_DIR, progress=progress)
    except Exception:
        Image.objects.filter(pk=image.pk).update(status=Image.Status.FAILED)
        raise
    manifest = json.loads((artifacts.disk.parent / "manifest.json").read_text())
    changed = image.digest != artifacts.digest or image.status != Image.Status.READY
    image.boot_mode = "uefi"
    image.disk_format = "raw"
    image.kernel_path = image.initramfs_path = ""
    image.rootfs_path = str(artifacts.disk)
    image.digest = artifacts.digest
    image.sha256 = manifest.get("sha256", "")
    image.file_sha256 = {"rootfs": image.sha256} if image.sha256 else {}
    image.size_bytes = artifacts.disk.stat().st_blocks * 512
    image.virtual_size_bytes = artifacts.disk.stat().st_size
    image.min_memory_mib = 256  # OVMF alone wants ~128 MiB
    image.min_disk_gib = 2
    image.status = Image.Status.READY
    image.save()
    Template.objects.get_or_create(
        name="linux-uefi",
        defaults={
            "description": "Debian 12 booted through UEFI firmware (q35 + OVMF under QEMU)",
            "image": image,
            "memory_mib": 512,
            "max_memory_mib": 4096,
            "disk_gib": 2,
            "max_disk_gib": 20,
        },
    )
    if changed:
        audit_record(actor=None, action="image.build", obj=image, after={"digest": artifacts.digest, "boot": "uefi"})
    return image
