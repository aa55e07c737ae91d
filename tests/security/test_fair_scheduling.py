"""Fair scheduling: one owner's burst of operations cannot hold every worker slot. An owner
already running SANDBOX_OPERATIONS_PER_OWNER operations has the next one deferred (re-queued,
the worker moves on); another owner's operation proceeds."""

from __future__ import annotations

from accounts.models import Role
from tests.factories import UserFactory, VmFactory
from vms import operations
from vms.models import Operation
from vms.operations import operation_execute, operation_new


def _op(vm, status=Operation.Status.PENDING):
    op = operation_new(vm=vm, action="start", actor=vm.owner)
    Operation.objects.filter(pk=op.pk).update(status=status, worker="elsewhere:1")
    return op


def test_an_owners_excess_operation_waits_and_others_proceed(db, settings, monkeypatch):
    settings.SANDBOX_OPERATIONS_PER_OWNER = 2
    busy = UserFactory(username="busy", role=Role.USER)
    other = UserFactory(username="other", role=Role.USER)
    for _ in range(2):
        _op(VmFactory(owner=busy), Operation.Status.RUNNING)
    waiting = _op(VmFactory(owner=busy))
    proceeding = _op(VmFactory(owner=other))
    sent = []
    monkeypatch.setattr(
        "vms.tasks.operation_run_task.apply_async", lambda args, queue, countdown=None: sent.append((args, countdown))
    )
    ran = []
    monkeypatch.setattr(operations, "operation_run", lambda op: ran.append(op.pk))

    operation_execute(waiting.pk)
    waiting.refresh_from_db()
    assert waiting.status == Operation.Status.PENDING and ran == []
    assert sent == [([str(waiting.pk)], settings.SANDBOX_OPERATIONS_DEFER_SECONDS)]  # re-queued, not dropped

    operation_execute(proceeding.pk)
    proceeding.refresh_from_db()
    assert proceeding.status == Operation.Status.SUCCEEDED and ran == [proceeding.pk]

    Operation.objects.filter(vm__owner=busy, status=Operation.Status.RUNNING).update(status=Operation.Status.SUCCEEDED)
    operation_execute(waiting.pk)  # the redelivered task, once a slot is free
    waiting.refresh_from_db()
    assert waiting.status == Operation.Status.SUCCEEDED and ran[-1] == waiting.pk
