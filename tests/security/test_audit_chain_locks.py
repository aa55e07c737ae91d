"""The audit chain and row locks: auditing takes no lock inside the caller's transaction, so
transactions that lock rows before and after auditing, in opposite orders, cannot deadlock
(threads with their own PostgreSQL connections, like test_quota_races.py). Rows are sealed
into the chain after commit, in commit order, and the chain stays intact."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable

import pytest
from django.core.management import call_command
from django.db import connection, transaction

from accounts.audit import audit_chain_verify, audit_record
from accounts.models import AuditEvent, UserQuota
from accounts.services import owner_quota_lock
from tests.factories import VmFactory
from tests.security.test_quota_races import _postgresql_and_quiet  # noqa: F401 - autouse fixture
from vms import services as vm_services
from vms.models import VM

pytestmark = pytest.mark.django_db(transaction=True)


def together(*steps: Callable[[], object]) -> None:
    """Run each step in its own thread and connection; fail with whatever any of them raised
    (a deadlock shows here as django.db.OperationalError "deadlock detected")."""
    errors: list[BaseException] = []

    def run(step):
        try:
            step()
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(step,)) for step in steps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a transaction is still waiting"
    assert not errors, errors


def _assert_chain_intact(expected_rows: int) -> None:
    report = audit_chain_verify()
    assert report.ok, report
    assert report.checked == AuditEvent.objects.count() == expected_rows
    assert report.unsealed == 0


def test_rows_locked_before_and_after_auditing_in_opposite_orders_do_not_deadlock(owner):
    vm = VmFactory(owner=owner)
    both_hold_their_first_lock = threading.Barrier(2)

    def audits_then_locks():
        with transaction.atomic():
            audit_record(actor=owner, action="test.audits_first", obj=vm)
            both_hold_their_first_lock.wait(10)
            owner_quota_lock(owner)
            VM.objects.select_for_update().get(pk=vm.pk)

    def locks_then_audits():
        with transaction.atomic():
            owner_quota_lock(owner)
            VM.objects.select_for_update().get(pk=vm.pk)
            both_hold_their_first_lock.wait(10)
            audit_record(actor=owner, action="test.locks_first", obj=vm)

    together(audits_then_locks, locks_then_audits)
    assert set(AuditEvent.objects.values_list("action", flat=True)) == {"test.audits_first", "test.locks_first"}
    _assert_chain_intact(2)


def test_services_composed_in_one_transaction_do_not_deadlock_with_a_service_in_between(owner, monkeypatch):
    # One transaction renames a VM (audited) and then resizes another (owner quota lock, VM
    # row); meanwhile a resize holds the quota lock and is about to audit.
    UserQuota.objects.update_or_create(
        user=owner, defaults={"max_vms": 10, "max_vcpus": 10, "max_memory_mib": 10_000, "max_disk_gib": 100}
    )
    renamed, resized = VmFactory(owner=owner, memory_mib=128), VmFactory(owner=owner, memory_mib=128)
    both_hold_their_first_lock = threading.Barrier(2)
    real_check = vm_services.vm_limits_check

    def limits_check_then_wait(**kwargs):
        real_check(**kwargs)
        if threading.current_thread().name == "resize":  # holds the owner's quota lock here
            both_hold_their_first_lock.wait(10)

    monkeypatch.setattr(vm_services, "vm_limits_check", limits_check_then_wait)

    def rename_then_resize():
        with transaction.atomic():
            vm_services.vm_update(vm=renamed, actor=owner, name="renamed")
            both_hold_their_first_lock.wait(10)
            vm_services.vm_resize(vm=VM.objects.get(pk=resized.pk), actor=owner, memory_mib=512)

    def resize():
        threading.current_thread().name = "resize"
        vm_services.vm_resize(vm=resized, actor=owner, memory_mib=256)

    together(rename_then_resize, resize)
    assert VM.objects.get(pk=resized.pk).memory_mib in (256, 512)
    assert AuditEvent.objects.filter(action="vm.resize").count() == 2
    _assert_chain_intact(3)


def test_rows_are_chained_in_commit_order_and_export_follows_it(owner):
    first_written = threading.Event()
    second_committed = threading.Event()

    def writes_first_commits_last():
        with transaction.atomic():
            audit_record(actor=owner, action="test.written_first")
            first_written.set()
            assert second_committed.wait(10)

    def writes_second_commits_first():
        assert first_written.wait(10)
        audit_record(actor=owner, action="test.written_second")  # no transaction: commits at once
        second_committed.set()

    together(writes_first_commits_last, writes_second_commits_first)
    first = AuditEvent.objects.get(action="test.written_first")
    second = AuditEvent.objects.get(action="test.written_second")
    assert first.id < second.id and first.chain_seq == 2 and second.chain_seq == 1
    assert first.prev_hash == second.hash
    _assert_chain_intact(2)
    out = io.StringIO()
    call_command("audit_export", stdout=out, stderr=io.StringIO())
    exported = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["action"], r["chain_seq"]) for r in exported] == [("test.written_second", 1), ("test.written_first", 2)]
    later = io.StringIO()
    call_command("audit_export", "--after-seq", "1", stdout=later, stderr=io.StringIO())
    assert [json.loads(line)["action"] for line in later.getvalue().splitlines()] == ["test.written_first"]


@pytest.mark.parametrize("web_process", [False, True], ids=["worker", "web-process"])
def test_an_action_commits_even_when_its_rows_cannot_be_sealed_at_once(owner, monkeypatch, caplog, web_process):
    """Both ways a commit seals: on_commit in a worker, the process's sealer in the web process
    (whether an earlier test imported the ASGI application must not decide which one runs)."""
    from accounts import audit

    monkeypatch.setattr(audit, "_SEAL_LOCK_TIMEOUT_MS", 200)
    monkeypatch.setattr(audit, "_web_process", web_process)
    held, release = threading.Event(), threading.Event()

    def a_sealer_that_hangs():
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [audit._CHAIN_LOCK_ID])
            held.set()
            release.wait(30)

    hanging = threading.Thread(target=lambda: (a_sealer_that_hangs(), connection.close()))
    hanging.start()
    try:
        assert held.wait(10)
        event = audit_record(actor=owner, action="test.while_locked")  # commits, then fails to seal
        assert "lock timeout" in caplog.text
        assert ("sealing audit rows after a response failed" if web_process else "_seal_after_commit") in caplog.text
    finally:
        release.set()
        hanging.join(30)
    event.refresh_from_db()
    assert event.chain_seq is None and audit_chain_verify().unsealed == 1
    assert audit.audit_chain_seal() == 1  # the periodic sealer's turn
    _assert_chain_intact(1)
