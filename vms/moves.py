"""Cold move of a VM to another hypervisor host (operators; drains use it for every VM).

``vm_move`` checks the request and records a ``move`` operation; the VM is ``moving`` until it
lands. The operation runs in steps, each on the worker that may touch what it touches, handed
from one queue to the next (``vms.operations.OperationHandoff``):

1. **stop**, on the source's worker: stop the VM if it runs (its NICs are unplumbed there) and
   list its files: the runtime directory's disk overlay, UEFI variables and console log, the
   layers its disk chain stands on, its snapshots' files (``vm_move_files`` hook) and the image
   files it boots.
2. **copy**, on a control-plane worker (``SANDBOX_TRANSFER_QUEUE``: hosts' own certificates
   cannot call another hostd): each file relayed from the source's hostd to the target's
   (``vms.transfer.host_file_copy``), verified by sha256 on the target before it takes its
   name; files the target holds already (the shared image) are not copied again.
3. **land**, on the target's worker: check the copies are there, then switch ``vm.host`` (and,
   through the ``vm_host_changed`` hook, its snapshots and port forwards) in one transaction;
   start the VM there if it was running (its NICs are plumbed on the target, the VXLAN peers
   told).
4. **cleanup**, on the source's worker: its files there are deleted (runtime directory, moved
   snapshots' directories; layers it only stood on stay).

A failure before the switch (copy or landing) deletes what this move copied to the target and
hands the VM back to its source (**stay**): as it was, a running one started again there.
Nothing is deleted on the source before the target holds verified copies and the database
says the VM is there. The VM keeps its id, addresses, MACs, snapshots and shares.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from accounts.audit import audit_record
from accounts.permissions import require_perm
from accounts.services import user_has_perm
from sandbox_site.errors import ApplicationError, ConflictError
from vms import hypervisor
from vms.admission import host_admission_check
from vms.hooks import hook_run
from vms.models import VM, Host, Operation, VmState
from vms.operations import OperationHandoff, operation_enqueue, operation_handler_register, operation_log, operation_new
from vms.placement import host_boot_refusal, host_runs_image
from vms.selectors import host_is_up
from vms.transfer import TransferError, host_file_copy_report, host_file_delete, host_roots, root_of
from vms.transitions import vm_transition, vm_transition_request
from vms.vmm.base import RuntimeState
from vms.vmm.snapshot import backing_chain

logger = logging.getLogger(__name__)
S = VmState

# Runtime-directory files that belong to a running VMM (or a half-written file), not to the VM.
_RUNTIME_SKIP = {"spec.json", "vmm.pid", "vmm.log"}
_RUNTIME_SKIP_SUFFIXES = (".sock", ".tmp", ".new", ".pid")


def vm_move(*, vm: VM, host: Host, actor) -> Operation:
    """Move ``vm`` (stopped or running) to ``host``: an operator's action (``vms.change_host``),
    audited ``vm.move``. 409 when the host is the VM's own, removed, cordoned or down, when
    the VM is neither stopped nor running, a warm-pool or golden-builder VM (``not_movable``)
    or an earlier move of it is still finishing (``move_in_progress``), and ``host_full`` when a
    running VM has no room there (admission, as for a start). From then on a running VM's size
    is held on the target too (``move_target``), until it lands or stays."""
    require_operator(actor, vm, action="vm.move")
    source = vm.host
    if not vm.user_visible:
        raise ConflictError(
            "Warm-pool and golden-builder VMs are not moved; their template's pool or golden snapshot is rebuilt.",
            code="not_movable",
            details={"purpose": vm.purpose},
        )
    if source is None:
        raise ConflictError("The VM has no host yet.", code="no_host")
    if host.pk == source.pk:
        raise ConflictError(f"The VM is on host {host.name} already.", code="same_host", details={"host": host.name})
    if not host.is_active or host.cordoned:
        raise ConflictError(
            f"Host {host.name} takes no VMs ({'cordoned' if host.cordoned else 'removed'}).",
            code="no_host",
            details={"host": host.name},
        )
    if not host_is_up(host, timezone.now()):
        raise ConflictError(f"Host {host.name} is down.", code="host_down", details={"host": host.name})
    if not host_runs_image(host, vm.boot_image, driver=vm.driver):
        raise host_boot_refusal(vm.boot_image, [host], driver=vm.driver)
    with transaction.atomic():
        vm.refresh_from_db()
        checked = vm.state
        if checked == S.RUNNING:
            # It starts there again: the target must admit it now (409 host_full).
            host_admission_check(host=host, vcpus=vm.vcpus, memory_mib=vm.memory_mib)
        previous = vm_transition_request(vm, "move")
        if previous != checked or vm.host_id != source.pk:  # changed since it was read
            raise ConflictError("The VM changed meanwhile (its state or host); try again.")
        # An earlier move's cleanup (on its old source) may still be queued: not before it is done.
        if Operation.objects.filter(
            vm=vm, action="move", status__in=[Operation.Status.PENDING, Operation.Status.RUNNING]
        ).exists():
            raise ConflictError(
                "An earlier move of this VM is still finishing (its cleanup); try again shortly.",
                code="move_in_progress",
            )
        # Under the VM row's lock (snapshot deletes and clones lock it too): its snapshots and
        # port forwards as they are now.
        hook_run("vm_move_check", vm=vm, target=host)
        if previous == S.RUNNING:
            # It starts there: its size is held on the target from now on (admission, placement,
            # drains), until it lands or stays.
            VM.objects.filter(pk=vm.pk).update(move_target=host)
        op = operation_new(
            vm=vm,
            action="move",
            actor=actor,
            params={
                "previous_state": previous,
                "source": str(source.pk),
                "target": str(host.pk),
                "step": "stop",
            },
        )
        audit_record(
            actor=actor,
            action="vm.move",
            obj=vm,
            before={"host": source.name, "state": previous},
            after={"host": host.name, "operation": str(op.pk)},
        )
        operation_enqueue(op, vm)
    return op


def vm_move_to(*, vm: VM, host_name: str, actor) -> Operation:
    """``vm_move`` to the host named ``host_name`` (the API's form): 403 before anything else
    for non-operators, 400 for a name no host has."""
    require_operator(actor, vm, action="vm.move")
    host = Host.objects.filter(name=host_name).first() if isinstance(host_name, str) else None
    if host is None:
        raise ApplicationError(f"There is no host named {host_name!r}.", details={"host": "unknown"})
    return vm_move(vm=vm, host=host, actor=actor)


def require_operator(actor, vm: VM, *, action: str) -> None:
    """Moving a VM between hosts (cold or live) is the operators' (their role's
    ``vms.change_host``); anyone else who sees the VM gets 403, audited as ``action``."""
    require_perm(
        actor,
        "vms.change_host",
        vm,
        action=action,
        allowed=user_has_perm(actor, "vms.change_host", None),
        message="Only operators may move VMs between hosts.",
    )


def vm_move_run(op: Operation, vm: VM) -> None:
    """The ``move`` operation's handler: the step recorded in its params, on this host."""
    step = op.params.get("step")
    if step == "stop":
        _stop(op, vm)
    elif step == "copy":
        _copy(op, vm)
    elif step == "stay":
        _stay_run(op, vm)
    elif step == "land":
        _land(op, vm)
    elif step == "cleanup":
        _cleanup(op, vm)
    else:
        raise ApplicationError(f"Unknown move step {step!r}.")


# --- the steps before the switch: stop (source), copy (control plane), stay (source) -------------


def _roots() -> dict[str, Path]:
    return host_roots()


def _relative(path: Path, roots: dict[str, Path]) -> tuple[str, str]:
    """(root name, path below it) of an absolute path; the first root holding it wins."""
    found = root_of(path, roots)
    if found is not None:
        return found
    raise ApplicationError(
        f"{path} is outside the directories hosts exchange (runtime, snapshots, images); the VM cannot move.",
        code="not_movable",
        details={"path": str(path)},
    )


@dataclass(frozen=True)
class MoveFiles:
    entries: list[tuple[str, str]]  # (root, path) to copy, what others build on first
    snapshot_dirs: list[str]  # below the snapshots root: they move with the VM
    pinned: list[str]  # absolute paths other files and rows name: the same on every host


def vm_move_files(vm: VM) -> MoveFiles:
    """On the VM's host: ``(root, path)`` of every file the VM needs on another host, the ones
    others build on first (base image, lower layers), its runtime directory's last; the
    snapshot directories (below the snapshots root) that move with it; and which files are
    named by absolute path (the target must have them at the same path)."""
    roots = _roots()
    runtime = hypervisor.runtime_dir(vm.pk)
    own: list[Path] = []
    if runtime.is_dir():
        for entry in sorted(runtime.iterdir()):
            name = entry.name
            if name in _RUNTIME_SKIP or name.startswith(".") or name.endswith(_RUNTIME_SKIP_SUFFIXES):
                continue
            if entry.is_file() and not entry.is_symlink():
                own.append(entry)
    snapshot_files: list[Path] = [Path(p) for result in hook_run("vm_move_files", vm=vm) for p in (result or [])]
    # The overlay's backing chain is read from a file the VMM writes: only layers below the
    # images' directories and the ones recorded for this VM (never another VM's files) count.
    recorded = {os.path.realpath(p) for result in hook_run("vm_move_layers", vm=vm) for p in (result or [])}
    recorded |= {os.path.realpath(p) for p in [*own, *snapshot_files]}
    image_roots = [os.path.realpath(roots["images"]), os.path.realpath(roots["image_store"])]
    below: list[Path] = []
    image = vm.boot_image
    for path in (image.rootfs_path, image.kernel_path, image.initramfs_path):
        if path and Path(path).is_file():
            below.append(Path(path))
    for layer in [*own, *snapshot_files]:
        if layer.suffix == ".qcow2" and layer.is_file():
            for p in reversed(backing_chain(layer)):
                _chain_entry_check(vm, layer, p, recorded, image_roots)
                below.append(Path(p))
    ordered: list[tuple[str, str]] = []
    for path in [*below, *snapshot_files, *own]:
        entry = _relative(path, roots)
        if entry not in ordered:
            ordered.append(entry)
    directories = sorted({_relative(p.parent, roots)[1] for p in snapshot_files})
    # Named by absolute path elsewhere (qcow2 backing files, image and snapshot rows): they
    # must be at the same path on the target.
    pinned = sorted({str(p) for p in [*below, *snapshot_files]})
    return MoveFiles(entries=ordered, snapshot_dirs=directories, pinned=pinned)


def _chain_entry_check(vm: VM, layer: Path, entry: str, recorded: set[str], image_roots: list[str]) -> None:
    """Refuse (nothing copied) a backing file that is neither below the images' directories nor
    a layer recorded for ``vm``."""
    real = os.path.realpath(entry)
    if real in recorded:
        return
    if any(os.path.commonpath([root, real]) == root and real != root for root in image_roots):
        return
    raise ApplicationError(
        f"The disk chain of {layer.name} names {entry}, which is neither an image nor one of this VM's "
        "snapshot layers; the VM is not moved.",
        code="not_movable",
        details={"path": str(entry), "vm": str(vm.pk)},
    )


def _stop(op: Operation, vm: VM) -> None:
    """Step 1, on the source: stop the VM if it runs, list its files, hand the copy to the
    control plane."""
    if vm.state != S.MOVING:
        return  # done by an earlier delivery, or someone else moved the VM
    source = vm.host
    driver = hypervisor.driver_for(vm.driver or hypervisor.driver_name_select())
    spec = hypervisor.vm_spec(vm)
    try:
        if vm.driver and driver.info(spec, timeout=5.0).state != RuntimeState.GONE:
            operation_log(
                op, f"stopping the VM for the move (guest power-off, {settings.SANDBOX_STOP_TIMEOUT:.0f}s)", progress=5
            )
            driver.shutdown(spec, graceful_timeout=settings.SANDBOX_STOP_TIMEOUT, force=False)
            VM.objects.filter(pk=vm.pk).update(vmm_pid=None, started_at=None)
            hook_run("vm_vmm_gone", vm=vm)
        found = vm_move_files(vm)
    except Exception as exc:
        message = getattr(exc, "message", None) or str(exc)
        operation_log(op, f"the move cannot go on: {message}")
        _stay(op, vm, op.params.get("previous_state"))
        raise ApplicationError(f"The move failed; the VM stays on host {source.name}: {message}") from exc
    params = {
        **op.params,
        "step": "copy",
        "entries": [list(entry) for entry in found.entries],
        "snapshot_dirs": found.snapshot_dirs,
        "pinned": found.pinned,
    }
    queue = settings.SANDBOX_TRANSFER_QUEUE
    raise OperationHandoff(queue, params, f"{len(found.entries)} file(s) to copy; the copy runs from queue {queue}")


def _copy(op: Operation, vm: VM) -> None:
    """Step 2, on a worker of the control plane (``SANDBOX_TRANSFER_QUEUE``): relay each file
    from the source's hostd to the target's; any failure removes what was copied and hands the
    VM back to its source."""
    if vm.state != S.MOVING:
        return
    source = Host.objects.get(pk=op.params["source"])
    target = Host.objects.get(pk=op.params["target"])
    entries = op.params.get("entries", [])
    owned = _owned(vm, op.params)
    copied: list[dict] = []
    files: list[dict] = []
    total = len(entries)
    operation_log(op, f"copying {total} file(s) from host {source.name} to {target.name}", progress=10)
    try:
        for n, (root, path) in enumerate(entries, 1):
            # The VM's own files: a stale copy (an earlier, killed attempt) is replaced.
            result = host_file_copy_report(
                source=source, target=target, root=root, path=path, overwrite=(root, path) in owned
            )
            entry = {"root": root, "path": path, "sha256": result.sha256, "size": result.size}
            files.append(entry)
            if result.copied:
                copied.append(entry)
            how = "copied" if result.copied else "already there"
            operation_log(
                op,
                f"{root}/{path}: {how} ({result.size} bytes, sha256 {result.sha256[:16]}…)",
                progress=10 + int(60 * n / max(total, 1)),
            )
    except Exception as exc:
        message = getattr(exc, "message", None) or str(exc)
        operation_log(op, f"copy failed: {message}; removing the VM's own files from {target.name}")
        _copies_remove(target, vm, op.params)
        raise OperationHandoff(
            source.queue, {**op.params, "step": "stay", "error": message}, f"back to host {source.name}"
        ) from exc
    params = {**op.params, "step": "land", "files": files, "copied": copied}
    raise OperationHandoff(target.queue, params, f"{len(files)} file(s) verified on {target.name}; landing there")


def _stay_run(op: Operation, vm: VM) -> None:
    """On the source, after a failed copy or landing: the VM as it was (a running one boots
    again here); the operation fails with the reason."""
    source = Host.objects.get(pk=op.params["source"])
    if vm.state == S.MOVING and vm.host_id == source.pk:
        _stay(op, vm, op.params.get("previous_state"))
    raise ApplicationError(f"The move failed; the VM stays on host {source.name}: {op.params.get('error', '')}")


def _owned(vm: VM, params: dict) -> set[tuple[str, str]]:
    """The entries to copy that belong to ``vm`` alone: its runtime directory's files and its
    snapshots' directories' (image and golden layers are shared with others)."""
    directories = tuple(f"{d.rstrip('/')}/" for d in params.get("snapshot_dirs", []))
    owned = set()
    for root, path in params.get("entries", []):
        if (root == "runtime" and path.startswith(f"{vm.pk}/")) or (
            root == "snapshots" and path.startswith(directories)
        ):
            owned.add((root, path))
    return owned


def _copies_remove(target: Host, vm: VM, params: dict) -> None:
    """After a failed move: delete the VM's own files from ``target`` (its runtime directory's,
    its snapshots'), whichever attempt copied them; shared layers (images, golden snapshots)
    stay, others may boot from them by now. Through the target's hostd; logs failures."""
    for root, path in sorted(_owned(vm, params)):
        try:
            host_file_delete(host=target, root=root, path=path)
        except TransferError:
            logger.warning("could not remove %s/%s from host %s", root, path, target.name)


def _stay(op: Operation, vm: VM, previous: str | None) -> None:
    """On the source, after a failure before the switch: the VM goes back to what it was (a
    running one boots again here); stopped when that fails too."""
    from vms.lifecycle import vm_boot_run

    VM.objects.filter(pk=vm.pk, state=S.MOVING).update(move_target=None)
    if previous == S.RUNNING:
        if vm_transition(vm, expected={S.MOVING}, new=S.STARTING):
            operation_log(op, f"starting the VM again on {vm.host.name}")
            try:
                vm_boot_run(op, vm)
            except Exception:
                logger.warning("restart of %s after a failed move failed", vm.pk, exc_info=True)
        return
    vm_transition(vm, expected={S.MOVING}, new=S.STOPPED)


# --- land, on the target ----------------------------------------------------------------------------


def _land(op: Operation, vm: VM) -> None:
    """On the target: check the copies, switch the VM's host, start it if it was running,
    hand the cleanup to the source. A redelivery after the switch goes on from there."""
    target = Host.objects.get(pk=op.params["target"])
    source = Host.objects.get(pk=op.params["source"])
    if vm.host_id == source.pk and vm.state == S.MOVING:
        _land_check(op, vm, target, source)
        try:
            with transaction.atomic():
                if op.params.get("previous_state") == S.RUNNING:
                    # It starts here: it must still fit (409 host_full), as a start would.
                    host_admission_check(host=target, vcpus=vm.vcpus, memory_mib=vm.memory_mib, vm=vm)
                if not VM.objects.filter(pk=vm.pk, state=S.MOVING, host=source).update(host=target, move_target=None):
                    return  # someone else changed it meanwhile
                vm.refresh_from_db()
                hook_run("vm_host_changed", vm=vm, source=source, target=target)
        except Exception as exc:  # the switch is rolled back: the VM is still the source's
            vm.refresh_from_db()
            _land_fail(op, vm, target, source, exc)
        operation_log(op, f"the VM is on host {target.name} now", progress=75)
    elif vm.host_id != target.pk:
        return  # someone else moved the VM
    boot_error = _land_start(op, vm)
    params = {**op.params, "step": "cleanup", "boot_error": boot_error}
    raise OperationHandoff(source.queue, params, f"removing the VM's files from host {source.name}")


def _land_fail(op: Operation, vm: VM, target: Host, source: Host, exc: Exception) -> None:
    """A landing failed before the switch: remove the VM's copies here, hand it back to its source."""
    message = getattr(exc, "message", None) or str(exc)
    operation_log(op, f"landing failed: {message}; removing the copies, the VM stays on {source.name}")
    _copies_remove(target, vm, op.params)
    raise OperationHandoff(
        source.queue, {**op.params, "step": "stay", "error": message}, f"back to host {source.name}"
    ) from exc


def _land_check(op: Operation, vm: VM, target: Host, source: Host) -> None:
    """Before the switch: every copy is in this host's directories and every file named by
    absolute path is at that path; snapshot files get the VMMs' read access. Otherwise the
    copies are removed and the VM handed back to its source."""
    roots = _roots()
    try:
        missing = [
            f"{entry['root']}/{entry['path']}"
            for entry in op.params.get("files", [])
            if not (roots[entry["root"]] / entry["path"]).is_file()
        ]
        if missing:
            # Each file was verified by sha256 as it arrived; absent here means this worker's
            # directories are not the ones its hostd serves.
            raise ApplicationError(f"copied files are not in this host's directories: {', '.join(missing[:5])}")
        elsewhere = [p for p in op.params.get("pinned", []) if not Path(p).is_file()]
        if elsewhere:
            raise ApplicationError(
                "this host keeps images or snapshots under other directories than the source "
                f"(not found here: {', '.join(elsewhere[:3])}); hosts need the same SANDBOX_IMAGE_DIR "
                "and SANDBOX_SNAPSHOT_DIR"
            )
        # Snapshots and frozen layers: root's, readable by the VMMs, as on the source.
        confinement = hypervisor.vmm_confinement()
        for directory in op.params.get("snapshot_dirs", []):
            confinement.reclaim(roots["snapshots"] / directory)
        for entry in op.params.get("files", []):
            if entry["root"] == "snapshots":
                confinement.reclaim(roots["snapshots"] / entry["path"])
    except Exception as exc:
        _land_fail(op, vm, target, source, exc)


def _land_start(op: Operation, vm: VM) -> str:
    """After the switch: the state it had before the move (a running VM boots here, as a start
    does: its NICs plumbed on this host). Returns why a boot failed ("" when it did not)."""
    from vms.lifecycle import vm_boot_run

    if op.params.get("previous_state") != S.RUNNING:
        vm_transition(vm, expected={S.MOVING}, new=S.STOPPED)
        return ""
    vm_transition(vm, expected={S.MOVING}, new=S.STARTING)
    if vm.state != S.STARTING:
        return ""  # booted by an earlier delivery, or someone else's operation owns it now
    try:
        vm_boot_run(op, vm)
    except Exception as exc:
        return getattr(exc, "message", None) or str(exc)
    return ""


# --- cleanup, on the source ---------------------------------------------------------------------------


def _cleanup(op: Operation, vm: VM) -> None:
    """Delete the moved files on the source (this host): the VM's runtime directory and the
    directories of the snapshots that moved with it. Layers it only stood on (the base image,
    the golden snapshot it was cloned from) stay: others use them here."""
    source = Host.objects.get(pk=op.params["source"])
    if vm.host_id == source.pk:
        raise ApplicationError("The VM is still recorded on this host; its files stay.")
    roots = _roots()
    directories = [hypervisor.runtime_dir(vm.pk)]
    directories += [roots["snapshots"] / path for path in op.params.get("snapshot_dirs", [])]
    removed = 0
    for directory in directories:
        if directory.is_dir():
            shutil.rmtree(directory, ignore_errors=True)
            removed += 1
    operation_log(op, f"removed {removed} director(ies) of the VM from host {source.name}", progress=95)
    boot_error = op.params.get("boot_error")
    if boot_error:
        raise ApplicationError(f"The VM moved to host {vm.host.name} but did not start there: {boot_error}")


def handlers_register() -> None:
    """Called from ``VmsConfig.ready``."""
    operation_handler_register("move", vm_move_run)
