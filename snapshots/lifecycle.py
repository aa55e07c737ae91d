"""Worker-side steps of the snapshot operations (``snapshot``, ``restore``, ``clone``),
registered with ``vms.operations`` from ``SnapshotsConfig.ready``, and the file side of
deleting. Run on the host that holds the VM and the snapshot files. Each step is
idempotent: a redelivered task finishes the job or leaves a defined state.

They use only public vms functions (``vms.transitions``, ``vms.operations``,
``vms.lifecycle``, ``vms.agent_gateway``) and never hold the VM's row lock while the VMM
works: the request put the VM in ``snapshotting`` (or ``starting`` for a restore)."""

from __future__ import annotations

import logging
import secrets
import shutil
import time
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from accounts.audit import audit_record
from sandbox_site.errors import ApplicationError, ConflictError
from snapshots import selectors
from snapshots.models import Snapshot, VmLineage
from vms import agent_gateway, hypervisor
from vms.hooks import hook_run
from vms.lifecycle import (
    vm_agent_wait,
    vm_before_launch,
    vm_boot_run,
    vm_create_run,
    vm_delete_row,
    vm_fail,
    vm_runtime_cleanup,
    vm_settle,
    vmm_kill_quietly,
)
from vms.models import VM, Operation, VmState
from vms.operations import operation_log
from vms.transitions import vm_transition, vm_transition_done, vm_transition_request
from vms.vmm.base import RuntimeState, VmmError, VmSpec
from vms.vmm.snapshot import (
    SnapshotIntegrityError,
    SnapshotMeta,
    backing_chain,
    disk_usage,
    layer_rebase,
    manifest_verify,
    manifest_write,
)

logger = logging.getLogger(__name__)
S = VmState


def _log(op: Operation, line: str, progress: int | None = None) -> None:
    operation_log(op, line, progress=progress)


def _cas(vm: VM, expected, new: str, **fields) -> bool:
    return vm_transition(vm, expected=expected, new=new, **fields)


def _lineage_set(vm: VM, snapshot: Snapshot) -> None:
    VmLineage.objects.update_or_create(vm=vm, defaults={"snapshot": snapshot})


# --- take ----------------------------------------------------------------------------------


def _take(driver, spec: VmSpec, dest: Path, snapshot: Snapshot) -> SnapshotMeta:
    return driver.snapshot(spec, dest, include_memory=snapshot.include_memory)


def snapshot_take(op: Operation, vm: VM) -> None:
    """Pause -> save state -> freeze the disk -> resume (driver), then manifest and record."""
    snapshot = Snapshot.objects.get(pk=op.params["snapshot"])
    if snapshot.state != Snapshot.State.CREATING:
        return
    if vm.state != S.SNAPSHOTTING:
        # The request moved the VM to snapshotting; anything else means a delivery of this
        # operation already finished it, or the VM was settled without it.
        Snapshot.objects.filter(pk=snapshot.pk, state=Snapshot.State.CREATING).update(
            state=Snapshot.State.FAILED, error=f"the VM was {vm.state} when the snapshot was to be taken"
        )
        raise ConflictError(f"Cannot snapshot a VM that is {vm.state}.")
    previous = op.params.get("previous_state") or S.RUNNING
    dest = Path(snapshot.directory)
    try:
        # No transaction or row lock here: the VM stays "snapshotting" (state changes are
        # refused) while the VMM pauses and saves it; other API writes go on.
        if snapshot.include_memory and previous == S.STOPPED:
            raise ConflictError("The VM stopped before its memory could be saved.")
        driver = hypervisor.driver_for(vm.driver or hypervisor.driver_name_select())
        spec = hypervisor.vm_spec(vm)
        if (dest / "snapshot.json").exists():
            # A previous attempt got past the freeze: the VM's disk already sits on it.
            meta = SnapshotMeta.read(dest)
            _log(op, "snapshot files already written by an earlier attempt", 60)
        else:
            shutil.rmtree(dest, ignore_errors=True)
            dest.parent.mkdir(parents=True, exist_ok=True)
            _log(op, f"pausing the VM to save its {'memory and ' if snapshot.include_memory else ''}disk state", 20)
            meta = _take(driver, spec, dest, snapshot)
            _log(op, f"VM paused for {meta.pause_ms} ms; resumed", 60)
    except Exception as exc:
        if not (dest / "snapshot.json").exists():
            shutil.rmtree(dest, ignore_errors=True)
        Snapshot.objects.filter(pk=snapshot.pk).update(
            state=Snapshot.State.FAILED, error=(getattr(exc, "message", None) or str(exc))[:2000]
        )
        vm_settle(vm, expected={S.SNAPSHOTTING}, previous=previous, why="snapshot failed")
        raise
    if previous == S.RUNNING:
        # An earlier delivery may have died between pause and resume: the VM was running.
        try:
            if driver.info(spec).state == RuntimeState.PAUSED:
                driver.resume(spec)
                _log(op, "resumed the VM an earlier attempt left paused")
        except VmmError as exc:
            _log(op, f"warning: could not check that the VM runs again: {exc.message}")
    _log(op, "writing the integrity manifest", 80)
    try:
        checksum = manifest_write(dest)
        files = manifest_verify(dest, expected_checksum=checksum)
    except Exception as exc:
        Snapshot.objects.filter(pk=snapshot.pk).update(
            state=Snapshot.State.FAILED, error=(getattr(exc, "message", None) or str(exc))[:2000]
        )
        vm_settle(vm, expected={S.SNAPSHOTTING}, previous=previous, why="snapshot failed")
        raise
    with transaction.atomic():
        parent = selectors.vm_lineage_snapshot(vm)
        layer = dest / (meta.disk_layer or "disk.qcow2")
        Snapshot.objects.filter(pk=snapshot.pk).update(
            state=Snapshot.State.READY,
            parent=parent,
            driver=meta.driver,
            vmm_version=meta.vmm_version,
            disk_layer=str(layer),
            backing_chain=meta.backing_chain,
            shared_layer=hypervisor.driver_capabilities(meta.driver).shared_disk_layers,
            size_bytes=disk_usage(dest),
            pause_ms=meta.pause_ms,
            duration_ms=meta.total_ms,
            checksum=checksum,
            files=files,
            verified_at=timezone.now(),
            error="",
        )
        snapshot.refresh_from_db()
        if snapshot.shared_layer:
            _lineage_set(vm, snapshot)  # the VM's new overlay sits on this layer
        audit_record(
            actor=op.requested_by,
            action="snapshot.created",
            obj=snapshot,
            after={
                "size_bytes": snapshot.size_bytes,
                "pause_ms": snapshot.pause_ms,
                "checksum": checksum,
                "parent": str(parent.pk) if parent else None,
            },
        )
        if not vm_transition_done(vm, "snapshot", previous=previous):
            _log(op, "the VM's state changed during the snapshot; leaving it as it is")


# --- verify -------------------------------------------------------------------------------


def snapshot_chain_verify(snapshot: Snapshot) -> list[Snapshot]:
    """Verify every file of the snapshot and of the ancestors its disk is built on; raises
    ``SnapshotIntegrityError`` naming the first bad file. Returns the chain."""
    chain = selectors.snapshot_chain(snapshot)
    confinement = hypervisor.vmm_confinement()
    for item in chain:
        manifest_verify(Path(item.directory), expected_checksum=item.checksum or None)
        # Root's, readable by the VMM group (as when it was taken): a snapshot copied here
        # from another host (a golden snapshot, a moved VM's) arrived root-only.
        confinement.reclaim(Path(item.directory))
    Snapshot.objects.filter(pk__in=[s.pk for s in chain]).update(verified_at=timezone.now())
    base = snapshot.backing_chain[-1] if snapshot.backing_chain else None
    if base and not Path(base).exists():
        raise SnapshotIntegrityError(f"snapshot base image missing: {base}", path=Path(base), reason="missing")
    return chain


def _integrity_refusal(snapshot: Snapshot, exc: SnapshotIntegrityError, *, what: str) -> ApplicationError:
    Snapshot.objects.filter(pk=snapshot.pk).update(error=exc.message[:2000])
    return ApplicationError(
        f"Snapshot {snapshot.name!r} failed its integrity check: {exc.message}. {what}",
        code="snapshot_corrupted",
        details=exc.details,
    )


# --- restore / clone -----------------------------------------------------------------------


def _identity_apply(op: Operation, vm: VM, spec: VmSpec, *, clone: bool) -> None:
    """After a restore the guest clock stands at the snapshot's time and its RNG state is
    the snapshot's; a clone also takes its own hostname, machine-id, MAC and address."""
    args: dict = {"clock_unix": time.time(), "entropy": secrets.token_hex(64)}
    if clone:
        args.update(hostname=vm.name, machine_id=vm.pk.hex)
        if spec.mac:
            args["macs"] = {"*": spec.mac.lower()}
        if getattr(settings, "SANDBOX_NETWORKING", False):
            from networking.services import nic_spec

            nic = nic_spec(vm=vm)
            if nic is not None:
                args["ipv4"] = {"address": f"{nic.ip}/{nic.prefix}", "gateway": nic.gateway}
    try:
        result = agent_gateway.agent_call(vm, "identity_set", args, timeout=20.0)[0]
    except ApplicationError as exc:
        if clone:
            raise ApplicationError(f"The clone's identity could not be set: {exc.message}") from exc
        _log(op, f"warning: guest clock/entropy not refreshed: {exc.message}")
        return
    _log(op, f"guest identity: {', '.join(result.get('applied', []))}")


def _restore_into(op: Operation, vm: VM, snapshot: Snapshot, *, clone: bool) -> None:
    driver = hypervisor.driver_for(snapshot.driver)
    spec = hypervisor.vm_spec(vm)
    if driver.info(spec).state != RuntimeState.GONE:
        driver.shutdown(spec, graceful_timeout=0, force=True)
    plumbed = vm_before_launch(vm)  # the VMM opens its TAP by name
    if plumbed:
        _log(op, "network: " + ", ".join(plumbed), 30)
    _log(op, f"starting {snapshot.driver} from snapshot {snapshot.name!r}", 40)
    started = time.monotonic()
    result = driver.restore(spec, Path(snapshot.directory))
    VM.objects.filter(pk=vm.pk).update(driver=result.driver, acceleration=result.acceleration, vmm_pid=result.pid)
    vm.refresh_from_db()
    vm_agent_wait(op, vm)
    _log(op, f"guest agent answered {time.monotonic() - started:.2f}s after the restore began", 80)
    _identity_apply(op, vm, spec, clone=clone)


def snapshot_restore_run(op: Operation, vm: VM) -> None:
    if vm.state != S.STARTING:
        return
    snapshot = Snapshot.objects.select_related("template__image").get(pk=op.params["snapshot"])
    previous = op.params.get("previous_state") or S.STOPPED
    try:
        _log(op, "verifying the snapshot's files", 10)
        snapshot_chain_verify(snapshot)
    except SnapshotIntegrityError as exc:
        # Nothing was touched yet: the VM goes back to what it was.
        _cas(vm, {S.STARTING}, previous)
        raise _integrity_refusal(snapshot, exc, what="The VM was left as it was.") from exc
    if (vm.vcpus, vm.memory_mib) != (snapshot.vcpus, snapshot.memory_mib):
        VM.objects.filter(pk=vm.pk).update(vcpus=snapshot.vcpus, memory_mib=snapshot.memory_mib)
        vm.refresh_from_db()
    try:
        _restore_into(op, vm, snapshot, clone=False)
    except Exception as exc:
        message = getattr(exc, "message", None) or str(exc)
        if vm_fail(vm, f"restore failed: {message}", expected={S.STARTING}):
            vmm_kill_quietly(vm, driver_name=snapshot.driver)
        raise
    with transaction.atomic():
        if snapshot.shared_layer:
            _lineage_set(vm, snapshot)
        won = vm_transition_done(vm, "restore", started_at=timezone.now(), last_error="", last_console="")
        audit_record(actor=op.requested_by, action="snapshot.restored", obj=snapshot, after={"vm": str(vm.pk)})
    if not won:
        _log(op, "state changed during the restore; leaving it to the newer operation")


def snapshot_clone_run(op: Operation, vm: VM) -> None:
    """A clone of a snapshot, or a create from the template's golden snapshot (``golden`` in
    the params): that one cold boots instead when the snapshot is gone, fails verification
    or cannot be restored."""
    golden = op.params.get("golden")
    pool = bool(op.params.get("pool"))
    golden = golden if not pool else None  # a pool VM that cannot be restored is discarded, not booted
    if golden and op.params.get("cold"):
        vm_create_run(op, vm)  # an earlier delivery already fell back to a cold boot
        return
    snapshot = Snapshot.objects.select_related("template__image").filter(pk=op.params["snapshot"]).first()
    if snapshot is None:
        if golden and vm.state == S.CREATING:
            _golden_fallback(op, vm, "its snapshot no longer exists")
            return
        vm_fail(vm, "clone failed: the snapshot no longer exists", expected={S.CREATING, S.STARTING})
        raise ApplicationError("The snapshot no longer exists.")
    if vm.state == S.CREATING:
        try:
            _log(op, "verifying the snapshot's files", 10)
            snapshot_chain_verify(snapshot)
        except SnapshotIntegrityError as exc:
            if golden:
                Snapshot.objects.filter(pk=snapshot.pk).update(error=exc.message[:2000])
                _golden_fallback(op, vm, f"it failed verification ({exc.message})")
                return
            if pool:
                _golden_mark_failed(op, f"it failed verification ({exc.message})")
            vm_fail(vm, f"clone failed: {exc.message}", expected={S.CREATING})
            raise _integrity_refusal(snapshot, exc, what="No VM was started.") from exc
        if not _cas(vm, {S.CREATING}, S.STARTING):
            return
    if vm.state != S.STARTING:
        return
    try:
        _restore_into(op, vm, snapshot, clone=True)
    except Exception as exc:
        message = getattr(exc, "message", None) or str(exc)
        vm_runtime_cleanup(vm)
        # Only the VMM refusing the snapshot says something about it; an agent that did not
        # answer in time (a loaded host) does not.
        refused = isinstance(exc, VmmError)
        if golden and _cas(vm, {S.STARTING}, S.CREATING):
            _golden_fallback(op, vm, f"it could not be restored ({message})", mark_failed=refused)
            return
        if pool and refused:
            _golden_mark_failed(op, f"it could not be restored ({message})")
        vm_fail(vm, f"clone failed: {message}", expected={S.STARTING})
        raise
    if pool:
        _pool_vm_pause(op, vm)
    with transaction.atomic():
        if snapshot.shared_layer:
            _lineage_set(vm, snapshot)
        done = S.PAUSED if pool else S.RUNNING
        _cas(vm, {S.STARTING}, done, started_at=timezone.now(), last_error="", last_console="")


def _pool_vm_pause(op: Operation, vm: VM) -> None:
    """A warm-pool VM waits paused (its guest uses no CPU) until a create takes it."""
    try:
        hypervisor.driver_for(vm.driver).pause(hypervisor.vm_spec(vm))
    except Exception as exc:
        message = getattr(exc, "message", None) or str(exc)
        vm_runtime_cleanup(vm)
        vm_fail(vm, f"pool VM could not be paused: {message}", expected={S.STARTING})
        raise
    _log(op, "paused: ready in the warm pool", 90)


def pool_take_run(op: Operation, vm: VM) -> None:
    """A create took this pool VM (``starting``): the new owner's network rules, resume, its
    identity (hostname = its new name, clock stepped, entropy reseeded), then ``running``."""
    if vm.state != S.STARTING:
        return
    spec = hypervisor.vm_spec(vm)
    try:
        hook_run("vm_owner_changed", vm=vm)
        driver = hypervisor.driver_for(vm.driver)
        if driver.info(spec).state == RuntimeState.PAUSED:
            driver.resume(spec)
        _log(op, "taken from the warm pool: resumed", 50)
        _identity_apply(op, vm, spec, clone=True)
    except Exception as exc:
        message = getattr(exc, "message", None) or str(exc)
        vm_runtime_cleanup(vm)
        vm_fail(vm, f"the pool VM could not be started: {message}", expected={S.STARTING})
        raise
    _cas(vm, {S.STARTING}, S.RUNNING, started_at=timezone.now(), last_error="", last_console="")


# --- golden snapshots ----------------------------------------------------------------------


def _golden_mark_failed(op: Operation, why: str) -> None:
    from snapshots.golden import golden_mark_failed

    if op.params.get("golden"):
        golden_mark_failed(op.params["golden"], why)


def _golden_fallback(op: Operation, vm: VM, why: str, *, mark_failed: bool = True) -> None:
    """The create's golden snapshot is unusable: say so in its log, keep later creates off
    it until it is rebuilt (``mark_failed``), and cold boot the VM (it is ``creating``)."""
    if mark_failed:
        _golden_mark_failed(op, why)
    _log(op, f"golden snapshot not used: {why}; cold boot instead", 10)
    op.params = {**op.params, "cold": True}
    Operation.objects.filter(pk=op.pk).update(params=op.params)
    VM.objects.filter(pk=vm.pk).update(driver="")
    vm.driver = ""
    vm_create_run(op, vm)


def golden_build_run(op: Operation, vm: VM) -> None:
    """Boot the builder VM cold to its agent, take a memory+disk snapshot of it, record it as
    the template's golden snapshot, then remove the builder (its disk layer stays in the
    snapshot). Any failure marks the golden snapshot failed and removes the builder."""
    from snapshots.models import GoldenSnapshot

    golden = GoldenSnapshot.objects.filter(pk=op.params["golden"]).first()
    if golden is None or golden.operation != op.pk:
        _log(op, "this build was superseded; removing the builder VM")
        _golden_builder_discard(vm)
        return
    try:
        if vm.state == S.CREATING:
            vm_create_run(op, vm)
        elif vm.state == S.STARTING:
            vm_boot_run(op, vm)
        vm.refresh_from_db()
        snapshot = _golden_snapshot_take(op, vm)
    except Exception as exc:
        message = getattr(exc, "message", None) or str(exc) or exc.__class__.__name__
        with transaction.atomic():
            GoldenSnapshot.objects.filter(pk=golden.pk, operation=op.pk).update(
                status=GoldenSnapshot.Status.FAILED, error=message[:2000]
            )
            audit_record(actor=op.requested_by, action="golden.failed", obj=golden, message=message[:2000])
        _golden_builder_discard(vm)
        raise
    with transaction.atomic():
        locked = GoldenSnapshot.objects.select_for_update().get(pk=golden.pk)
        replaced = locked.snapshot_id
        locked.snapshot = snapshot
        locked.status = GoldenSnapshot.Status.READY
        locked.image_version = op.params.get("image_version", "")
        locked.inputs = op.params.get("inputs", "")
        locked.error = ""
        locked.built_at = timezone.now()
        locked.save()
        audit_record(
            actor=op.requested_by,
            action="golden.built",
            obj=locked,
            after={"snapshot": str(snapshot.pk), "checksum": snapshot.checksum, "image_version": locked.image_version},
        )
    _log(op, f"golden snapshot ready ({snapshot.size_bytes >> 20} MiB, manifest sha256 {snapshot.checksum[:12]})", 95)
    _golden_builder_discard(vm)
    if replaced:
        from snapshots.golden import golden_retired_delete

        golden_retired_delete(host=vm.host)


def _golden_snapshot_take(op: Operation, vm: VM) -> Snapshot:
    """The builder runs: snapshot it with the ordinary snapshot step (idempotent: a
    redelivery finds the snapshot recorded in the operation's params)."""
    from snapshots.golden import GOLDEN_SNAPSHOT_NAME
    from snapshots.services import snapshot_row_new

    snapshot = Snapshot.objects.filter(pk=op.params.get("snapshot") or None).first()
    if snapshot is None:
        with transaction.atomic():
            snapshot = snapshot_row_new(vm=vm, name=GOLDEN_SNAPSHOT_NAME, include_memory=True)
            previous = vm_transition_request(vm, "snapshot", allowed=frozenset({S.RUNNING}))
            op.params = {**op.params, "snapshot": str(snapshot.pk), "previous_state": previous}
            Operation.objects.filter(pk=op.pk).update(params=op.params)
    vm.refresh_from_db()
    snapshot_take(op, vm)
    snapshot.refresh_from_db()
    if snapshot.state != Snapshot.State.READY:
        raise ApplicationError(f"The golden snapshot is {snapshot.state}: {snapshot.error}")
    return snapshot


def _golden_builder_discard(vm: VM) -> None:
    vm_runtime_cleanup(vm)
    if VM.objects.filter(pk=vm.pk).exists():
        vm_delete_row(vm, actor=None)


# --- delete (files) --------------------------------------------------------------------------


def snapshot_files_delete(snapshot_id) -> None:
    """Merge the layer into its one dependent when there is one, then remove the files and
    the row. Idempotent."""
    snapshot = Snapshot.objects.filter(pk=snapshot_id).select_related("parent").first()
    if snapshot is None or snapshot.state != Snapshot.State.DELETING:
        return
    directory = Path(snapshot.directory) if snapshot.directory else None
    new_backing = Path(snapshot.backing_chain[0]) if snapshot.backing_chain else None
    deps = selectors.snapshot_dependents(snapshot)
    if deps["snapshots"] or deps["vms"]:
        from snapshots.services import snapshot_merge_target

        target = snapshot_merge_target(snapshot, deps)
        if target is None:
            Snapshot.objects.filter(pk=snapshot.pk).update(
                state=Snapshot.State.READY, error="deletion refused: the layer came into use"
            )
            return
        kind, _, ident = target.partition(":")
        if kind == "snapshot":
            child = Snapshot.objects.get(pk=ident)
            layer_rebase(Path(child.disk_layer), new_backing)
            checksum = manifest_write(Path(child.directory))
            Snapshot.objects.filter(pk=child.pk).update(
                parent=snapshot.parent,
                backing_chain=backing_chain(Path(child.disk_layer)),
                checksum=checksum,
                files=manifest_verify(Path(child.directory), expected_checksum=checksum),
                size_bytes=disk_usage(Path(child.directory)),
            )
        else:
            vm = VM.objects.select_related("template__image").get(pk=ident)
            spec = hypervisor.vm_spec(vm)
            if hypervisor.driver_for(vm.driver or "qemu").info(spec).state != RuntimeState.GONE:
                Snapshot.objects.filter(pk=snapshot.pk).update(
                    state=Snapshot.State.READY, error="deletion refused: the VM started meanwhile"
                )
                return
            layer_rebase(spec.runtime_dir / "overlay.qcow2", new_backing)
            if snapshot.parent_id:
                VmLineage.objects.filter(vm=vm).update(snapshot=snapshot.parent)
            else:
                VmLineage.objects.filter(vm=vm).delete()
    with transaction.atomic():
        Snapshot.objects.filter(parent=snapshot).update(parent=snapshot.parent)
        VmLineage.objects.filter(snapshot=snapshot).delete()
        Snapshot.objects.filter(pk=snapshot.pk).delete()
        audit_record(
            actor=None,
            action="snapshot.deleted",
            object_type="snapshots.snapshot",
            object_id=str(snapshot.pk),
            object_repr=str(snapshot),
            object_owner_id=snapshot.owner_id,
        )
    if directory is not None and directory.is_dir() and directory.parent == Path(settings.SANDBOX_SNAPSHOT_DIR):
        shutil.rmtree(directory, ignore_errors=True)


def snapshots_verify_all(*, host=None) -> list[dict]:
    """Check every ready snapshot's files (``manage.py snapshot_verify``)."""
    report = []
    qs = Snapshot.objects.filter(state=Snapshot.State.READY).order_by("created_at")
    if host is not None:
        qs = qs.filter(host=host)
    for snapshot in qs:
        try:
            manifest_verify(Path(snapshot.directory), expected_checksum=snapshot.checksum or None)
        except SnapshotIntegrityError as exc:
            Snapshot.objects.filter(pk=snapshot.pk).update(error=exc.message[:2000])
            report.append({"snapshot": str(snapshot.pk), "name": str(snapshot), "ok": False, "error": exc.message})
        else:
            Snapshot.objects.filter(pk=snapshot.pk).update(verified_at=timezone.now(), error="")
            report.append({"snapshot": str(snapshot.pk), "name": str(snapshot), "ok": True, "error": ""})
    return report
