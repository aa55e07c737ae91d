"""Live migration of a running VM to another host: the business rules (``vm_migrate``) and the
worker steps of its ``migrate`` operation.

The operation alternates between the two hosts' workers (only a host's own worker touches its
runtime directories, VMMs, TAPs and rules), handing itself off with ``OperationHandoff``; each
step reads where it is from ``op.params["phase"]`` and hands itself to the right queue when it
was delivered to the wrong one, so a redelivery is harmless:

=========  ======  =====================================================================
phase      host    what it does, then
=========  ======  =====================================================================
prepare    target  NICs plumbed here, ``Driver.migrate_receive_prepare`` on the host's
                   underlay (tunnel) address -> send
send       source  ``Driver.migrate_send`` (disk and RAM; on failure the VM runs on here,
                   state back to running) -> finish (failure: abort)
finish     target  the row switches to this host (compare-and-set on ``migrating`` and the
                   source), rules and tunnels re-made here with the VM, peers told, the
                   newest 64 KiB of the source's console log put first in this one,
                   ``Driver.migrate_receive_finish`` (the guest runs here), the guest agent
                   reached through this host's hostd, state running, hook ``vm_migrated``
                   -> cleanup (failure: row back to the source, target undone -> rollback)
cleanup    source  the stopped source VMM and its runtime directory removed, hook
                   ``vm_migrated_away`` (TAPs here removed, rules re-made) -> done
abort      target  the half-received VMM removed, hook ``vm_migrated_away`` -> failed
rollback   source  ``Driver.migrate_cancel`` (the VM resumes here), rules re-made, state
                   running -> failed
=========  ======  =====================================================================

A failure before the switch leaves the VM running on its source host. The guest pauses for the
VMM's last round of the copy plus one hand-off between the workers (send -> finish).
"""

from __future__ import annotations

import base64
import copy
import logging
import os
import uuid
from dataclasses import asdict
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from accounts.audit import audit_record
from sandbox_site.errors import ApplicationError, ConflictError
from vms import agent_gateway, hypervisor, pki
from vms.admission import host_admission_check
from vms.hooks import hook_run
from vms.lifecycle import vm_before_launch
from vms.models import VM, BootMode, Host, Operation, VmState
from vms.moves import require_operator
from vms.operations import OperationHandoff, operation_enqueue, operation_handler_register, operation_log, operation_new
from vms.selectors import host_is_up
from vms.transitions import vm_transition, vm_transition_request
from vms.vmm.base import MIGRATION_DISK_MIRROR, Driver, MigrationTarget, VmSpec

logger = logging.getLogger(__name__)
S = VmState

PREPARE, SEND, FINISH, CLEANUP, ABORT, ROLLBACK = "prepare", "send", "finish", "cleanup", "abort", "rollback"
ON_TARGET = frozenset({PREPARE, FINISH, ABORT})
PREPARE_TIMEOUT = 60.0
FINISH_TIMEOUT = 60.0
# The newest console output that follows the VM to its new host (the rest of the source's log
# goes with its runtime directory); kept in the operation's params on the way.
CONSOLE_CARRY_BYTES = 64 << 10
SERIAL_LOG = "serial.log"


def vm_migrate(*, vm: VM, host: Host | str, actor) -> Operation:
    """Move running ``vm`` to ``host`` (a ``Host`` or its name) without stopping it: operators
    only (``vms.change_host``, audited ``vm.migrate``). 409 when the VM is not running, its
    driver cannot live-migrate without shared storage, the host is its own, removed,
    cordoned, down, has no underlay (tunnel) address, or has no room (``host_full``)."""
    require_operator(actor, vm, action="vm.migrate")
    if isinstance(host, str):
        found = Host.objects.filter(name=host).first()
        if found is None:
            raise ApplicationError(f"There is no host named {host!r}.", code="unknown_host", details={"host": host})
        host = found
    source = vm.host
    if source is None:
        raise ConflictError("The VM is on no host yet.", code="no_host")
    if host.pk == source.pk:
        raise ConflictError(f"The VM already runs on {host.name}.", code="same_host")
    if not host.is_active or host.cordoned:
        state = "cordoned" if host.is_active else "removed"
        raise ConflictError(f"Host {host.name} takes no VMs ({state}).", code="host_unavailable")
    if not host_is_up(host, timezone.now()):
        raise ConflictError(f"Host {host.name} is down.", code="host_down")
    if not host.tunnel_address:
        raise ConflictError(
            f"Host {host.name} has no underlay (tunnel) address to receive a migration on.",
            code="no_tunnel_address",
        )
    caps = hypervisor.driver_capabilities(vm.driver) if vm.driver else None
    if caps is None or not caps.live_migration or caps.live_migration_disk != MIGRATION_DISK_MIRROR:
        why = "without shared storage" if caps is not None and caps.live_migration else "while it runs"
        raise ConflictError(
            f"The {vm.driver or 'current'} driver cannot move a VM between hosts {why}.",
            code="migration_unsupported",
        )
    if vm.boot_image.boot_mode != BootMode.KERNEL:
        raise ConflictError(
            "Firmware-booted (UEFI) VMs cannot be live-migrated yet: their UEFI variables would not follow.",
            code="migration_unsupported",
        )
    hook_run("vm_migrate_check", vm=vm, target=host)
    with transaction.atomic():
        # Under the target's row lock until commit; the VM counts there once its row moves.
        host_admission_check(host=host, vcpus=vm.vcpus, memory_mib=vm.memory_mib)
        previous = vm_transition_request(vm, "migrate")
        VM.objects.filter(pk=vm.pk).update(move_target=host)  # held there too until it switches
        op = operation_new(
            vm=vm,
            action="migrate",
            actor=actor,
            params={"phase": PREPARE, "source": source.name, "target": host.name, "previous_state": previous},
        )
        audit_record(
            actor=actor,
            action="vm.migrate",
            obj=vm,
            before={"host": source.name, "state": previous},
            after={"host": host.name, "operation": str(op.pk)},
        )
        operation_enqueue(op, vm, queue=host.queue)
    return op


# --- worker steps ------------------------------------------------------------------------


def vm_migrate_run(op: Operation, vm: VM) -> None:
    """The ``migrate`` operation's handler: runs the step ``op.params["phase"]`` names."""
    from vms.services import local_host

    params = dict(op.params)
    phase = params.get("phase", PREPARE)
    source = Host.objects.get(name=params["source"])
    target = Host.objects.get(name=params["target"])
    here = target if phase in ON_TARGET else source
    if local_host().pk != here.pk:
        raise OperationHandoff(here.queue, params)
    driver = hypervisor.driver_for(vm.driver)
    spec = hypervisor.vm_spec(vm)
    _STEPS[phase](op, vm, params, driver, spec, source, target)


def _prepare(op, vm, params, driver: Driver, spec: VmSpec, source: Host, target: Host) -> None:
    if vm.state != S.MIGRATING:
        operation_log(op, f"the VM is {vm.state} now; not migrating")
        return
    on_target = copy.copy(vm)
    on_target.host, on_target.host_id = target, target.pk  # plumbing for this host, row unchanged
    try:
        lines = vm_before_launch(on_target)
        if lines:
            operation_log(op, f"{target.name}: network " + ", ".join(lines), progress=10)
        prepared = driver.migrate_receive_prepare(
            spec, listen_host=str(target.tunnel_address), tls=pki.migration_tls_local(), timeout=PREPARE_TIMEOUT
        )
    except Exception as exc:
        _target_undo(vm, driver, spec, target)
        vm_transition(vm, expected={S.MIGRATING}, new=S.RUNNING)
        raise ApplicationError(f"Could not prepare host {target.name}: {_message(exc)}") from exc
    how = "TLS" if prepared.tls else "plain TCP"
    operation_log(op, f"{target.name} listens on {prepared.host}:{prepared.port} ({how})", progress=20)
    params.update(phase=SEND, target_info=prepared.to_dict())
    raise OperationHandoff(source.queue, params)


def _send(op, vm, params, driver: Driver, spec: VmSpec, source: Host, target: Host) -> None:
    if vm.state != S.MIGRATING:
        params.update(phase=ABORT, error=f"The VM became {vm.state} before it was sent.")
        raise OperationHandoff(target.queue, params)
    operation_log(op, f"sending disk and memory to {target.name}", progress=30)
    try:
        prepared = MigrationTarget.from_dict(params["target_info"])
        # Over TLS exactly when the target listens with it (it has its migration certificate).
        tls = pki.migration_tls_local() if prepared.tls else None
        if prepared.tls and tls is None:
            raise ApplicationError(
                f"{target.name} takes migrations over TLS only and {source.name} has no migration certificate "
                "(manage.py host_join issues one)."
            )
        result = driver.migrate_send(spec, prepared, tls=tls, timeout=settings.SANDBOX_MIGRATION_TIMEOUT)
    except Exception as exc:
        # The driver cancels its own copy; cancelling again also resumes a source that a
        # completed send stopped (a redelivered step finds it so): the VM runs on here.
        try:
            driver.migrate_cancel(spec)
        except Exception:
            logger.warning("cancelling the migration of %s on %s failed", vm.pk, source.name, exc_info=True)
        vm_transition(vm, expected={S.MIGRATING}, new=S.RUNNING)
        params.update(phase=ABORT, error=f"Sending the VM to {target.name} failed: {_message(exc)}")
        raise OperationHandoff(target.queue, params) from exc
    operation_log(
        op,
        f"sent in {result.total_ms} ms (guest paused {result.downtime_ms} ms; RAM {result.ram_bytes >> 20} MiB, "
        f"disk {result.disk_bytes >> 20} MiB, {result.disk_sync})",
        progress=70,
    )
    params.update(phase=FINISH, result=asdict(result), console=_console_tail(spec))
    raise OperationHandoff(target.queue, params)


def _finish(op, vm, params, driver: Driver, spec: VmSpec, source: Host, target: Host) -> None:
    switched = VM.objects.filter(pk=vm.pk, state=S.MIGRATING, host_id=source.pk).update(
        host=target, move_target=None, updated_at=timezone.now()
    )
    vm.refresh_from_db()
    if not switched and not (vm.state == S.MIGRATING and vm.host_id == target.pk):  # not an earlier delivery's
        _target_undo(vm, driver, spec, target)
        raise ApplicationError(f"The VM became {vm.state} during its migration; it was not moved.")
    try:
        vm_before_launch(vm)  # this host's tunnels and rules now with the VM; its peers are told
        _console_carry(spec, params.pop("console", ""))
        driver.migrate_receive_finish(spec, timeout=FINISH_TIMEOUT)
    except Exception as exc:
        VM.objects.filter(pk=vm.pk, state=S.MIGRATING, host_id=target.pk).update(host=source)
        vm.refresh_from_db()
        _target_undo(vm, driver, spec, target)
        params.update(phase=ROLLBACK, error=f"The VM did not start on {target.name}: {_message(exc)}")
        raise OperationHandoff(source.queue, params) from exc
    operation_log(op, f"runs on {target.name}", progress=80)
    try:
        agent = agent_gateway.agent_wait(vm, timeout=settings.SANDBOX_BOOT_TIMEOUT)
        operation_log(op, f"guest agent answers on {target.name} (boot {agent.get('boot_id', '?')})", progress=90)
    except ApplicationError as exc:  # the guest runs; its agent is retried by whoever calls it
        operation_log(op, f"guest agent not reached yet on {target.name}: {exc.message}")
    info = driver.info(spec, timeout=5.0)
    vm_transition(vm, expected={S.MIGRATING}, new=S.RUNNING, vmm_pid=info.pid)
    hook_run("vm_migrated", vm=vm, source=source, target=target)
    params.update(phase=CLEANUP)
    raise OperationHandoff(source.queue, params)


def _cleanup(op, vm, params, driver: Driver, spec: VmSpec, source: Host, target: Host) -> None:
    try:
        driver.cleanup(spec)
    except Exception:
        logger.warning("cleanup of %s on %s after its migration failed", vm.pk, source.name, exc_info=True)
    hook_run("vm_migrated_away", vm=vm, host=source)
    operation_log(op, f"moved from {source.name} to {target.name}")


def _abort(op, vm, params, driver: Driver, spec: VmSpec, source: Host, target: Host) -> None:
    _target_undo(vm, driver, spec, target)
    raise ApplicationError(params.get("error") or "The migration failed; the VM runs on its source host.")


def _rollback(op, vm, params, driver: Driver, spec: VmSpec, source: Host, target: Host) -> None:
    try:
        driver.migrate_cancel(spec)
        vm_before_launch(vm)  # the source's rules and tunnels with the VM again
    finally:
        vm_transition(vm, expected={S.MIGRATING}, new=S.RUNNING)
    raise ApplicationError(params.get("error") or "The migration failed; the VM runs on its source host.")


def _target_undo(vm: VM, driver: Driver, spec: VmSpec, target: Host) -> None:
    """On the target: the receiving VMM and its files go, and the TAPs made for it (logged,
    not raised: the VM's fate is decided by the caller)."""
    try:
        driver.migrate_receive_abort(spec)
    except Exception:
        logger.warning("removing the half-migrated %s on %s failed", vm.pk, target.name, exc_info=True)
    try:
        hook_run("vm_migrated_away", vm=vm, host=target)
    except Exception:
        logger.warning("network clean-up of %s on %s failed", vm.pk, target.name, exc_info=True)


def migration_leftovers_remove(host: Host) -> int:
    """Reconcile, on ``host``: the runtime directories here of VMs that are on another host
    and neither migrating nor moving (a cold move may be copying its disk into this very
    directory), but were migrating from or to this one (a cleanup or abort step that was lost
    or failed), go with the VMM in them and the VM's TAPs here (hook ``vm_migrated_away``).
    Returns how many."""
    root = Path(settings.SANDBOX_RUNTIME_DIR)
    if not root.is_dir():
        return 0
    ids = []
    for entry in root.iterdir():
        try:
            ids.append(uuid.UUID(entry.name))
        except ValueError:
            continue
    if not ids:
        return 0
    left = (
        VM.objects.filter(pk__in=ids, host__isnull=False)
        .exclude(host=host)
        .exclude(state__in=(S.MIGRATING, S.MOVING))
        .exclude(driver="")
        .select_related("template__image", "host")
    )
    removed = 0
    for vm in left:
        ours = Q(params__source=host.name) | Q(params__target=host.name)
        if not Operation.objects.filter(ours, vm=vm, action="migrate").exists():
            continue  # not ours to judge (e.g. a directory another process is making)
        try:
            hypervisor.driver_for(vm.driver).cleanup(hypervisor.vm_spec(vm))
            hook_run("vm_migrated_away", vm=vm, host=host)
        except Exception:
            logger.warning("removing what %s left on %s after its migration failed", vm.pk, host.name, exc_info=True)
            continue
        removed += 1
    return removed


def _console_tail(spec: VmSpec) -> str:
    """The newest ``CONSOLE_CARRY_BYTES`` of the source's console log (base64): the guest is
    stopped, so it is final."""
    try:
        with open(spec.runtime_dir / SERIAL_LOG, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - CONSOLE_CARRY_BYTES))
            return base64.b64encode(fh.read()).decode()
    except OSError:
        return ""


def _console_carry(spec: VmSpec, tail: str) -> None:
    """Before the guest resumes on the target: its console log there starts with the source's
    newest lines (the VMM appends to the file; the guest has written nothing here yet). Only
    into an empty log: a redelivered step adds nothing twice."""
    path = spec.runtime_dir / SERIAL_LOG
    if not tail or (path.exists() and path.stat().st_size > 0):
        return
    with open(path, "ab") as fh:
        fh.write(base64.b64decode(tail)[-CONSOLE_CARRY_BYTES:])


def _message(exc: Exception) -> str:
    return getattr(exc, "message", None) or str(exc) or exc.__class__.__name__


_STEPS = {
    PREPARE: _prepare,
    SEND: _send,
    FINISH: _finish,
    CLEANUP: _cleanup,
    ABORT: _abort,
    ROLLBACK: _rollback,
}


def handlers_register() -> None:
    """Called from ``VmsConfig.ready``."""
    operation_handler_register("migrate", vm_migrate_run)
