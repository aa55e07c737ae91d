"""Host heartbeats: a host whose worker or hostd stops answering is down and its running and
paused VMs become ``unknown``; when it answers again they take the state their VMM reports."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from tests.vms.conftest import fake_vm_in
from vms import operations
from vms.models import Host, VmState
from vms.operations import hosts_check, vms_reconcile
from vms.selectors import host_is_up
from vms.transitions import TRANSITIONS, vm_actions_allowed
from vms.vmm import fake as fake_vmm

S = VmState


def _beat(host: Host, *, worker_ago: float, hostd_ago: float | None) -> None:
    now = timezone.now()
    Host.objects.filter(pk=host.pk).update(
        last_seen_at=now - timedelta(seconds=worker_ago),
        hostd_seen_at=None if hostd_ago is None else now - timedelta(seconds=hostd_ago),
    )
    host.refresh_from_db()


def test_it_marks_the_vms_of_a_host_whose_heartbeat_stopped_unknown(fake, owner, settings):
    settings.SANDBOX_HOST_DOWN_SECONDS = 30
    running = fake_vm_in(S.RUNNING, owner=owner)
    paused = fake_vm_in(S.PAUSED, owner=owner, host=running.host)
    stopped = fake_vm_in(S.STOPPED, owner=owner, host=running.host)
    _beat(running.host, worker_ago=5, hostd_ago=5)
    assert host_is_up(running.host, timezone.now())
    assert hosts_check() == {"hosts_down": 0, "unknown": 0}

    _beat(running.host, worker_ago=120, hostd_ago=5)  # the worker stopped
    assert not host_is_up(running.host, timezone.now())
    assert hosts_check() == {"hosts_down": 1, "unknown": 2}
    for vm in (running, paused, stopped):
        vm.refresh_from_db()
    assert (running.state, paused.state, stopped.state) == (S.UNKNOWN, S.UNKNOWN, S.STOPPED)


def test_a_host_whose_hostd_stopped_answering_is_down(fake, owner, settings):
    vm = fake_vm_in(S.RUNNING, owner=owner)
    _beat(vm.host, worker_ago=1, hostd_ago=300)
    assert hosts_check()["unknown"] == 1
    _beat(vm.host, worker_ago=1, hostd_ago=None)
    assert not host_is_up(vm.host, timezone.now())


def test_unknown_vms_take_what_their_vmm_reports_when_the_host_answers_again(fake, owner, monkeypatch):
    running = fake_vm_in(S.RUNNING, owner=owner)
    paused = fake_vm_in(S.PAUSED, owner=owner, host=running.host)
    gone = fake_vm_in(S.RUNNING, owner=owner, host=running.host)
    _beat(running.host, worker_ago=999, hostd_ago=999)
    hosts_check()
    fake_vmm.fake_vmm_die(str(gone.pk), reason="host rebooted")

    # While hostd still does not answer, reconcile leaves them unknown (no flapping).
    monkeypatch.setattr(operations, "host_heartbeat", lambda host, now: False)
    vms_reconcile(running.host)
    running.refresh_from_db()
    assert running.state == S.UNKNOWN

    monkeypatch.setattr(operations, "host_heartbeat", lambda host, now: True)
    vms_reconcile(running.host)
    for vm in (running, paused, gone):
        vm.refresh_from_db()
    assert (running.state, paused.state, gone.state) == (S.RUNNING, S.PAUSED, S.ERROR)
    assert "host came back" in gone.last_error


def test_the_worker_heartbeat_records_hostd_and_capacity(fake, owner):
    vm = fake_vm_in(S.RUNNING, owner=owner)
    assert operations.host_heartbeat(vm.host, timezone.now()) is False  # no hostd in unit tests
    vm.host.refresh_from_db()
    assert vm.host.last_seen_at is not None and vm.host.hostd_seen_at is None
    assert vm.host.hostd_status["up"] is False
    assert vm.host.cpus >= 1 and vm.host.memory_mib > 0


@pytest.mark.parametrize("action", ["stop", "delete"])
def test_an_unknown_vm_can_only_be_stopped_or_deleted(action):
    assert S.UNKNOWN in TRANSITIONS[action].allowed_from
    assert vm_actions_allowed(S.UNKNOWN) == ["delete", "stop"]
