"""Per-host periodic work (reconcile, samples, snapshot retention, golden snapshots) reaches
every live host: the installation's one beat schedules a fan-out on the shared queue, which
sends the task to each host's queue, not only to the queue of beat's own machine."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from sandbox_site.errors import ApplicationError
from tests.factories import HostFactory
from vms import hosts
from vms.hosts import HOST_PERIODIC_TASKS, host_periodic_fanout
from vms.models import Host


@pytest.fixture
def sent(monkeypatch) -> list[tuple[str, str, float]]:
    calls: list[tuple[str, str, float]] = []
    monkeypatch.setattr(
        hosts.current_app, "send_task", lambda name, *, queue, expires: calls.append((name, queue, expires))
    )
    return calls


def test_it_sends_the_task_to_each_live_active_host(db, sent, settings) -> None:
    settings.SANDBOX_HOST_DOWN_SECONDS = 30
    now = timezone.now()
    for name, ago, active in (("h1", 2, True), ("h2", 20, True), ("dead", 300, True), ("gone", 2, False)):
        HostFactory(name=name)
        Host.objects.filter(name=name).update(last_seen_at=now - timedelta(seconds=ago), is_active=active)
    HostFactory(name="never")  # a row without a worker (e.g. a web machine's own name)
    assert host_periodic_fanout(task_name="vms.tasks.vms_reconcile_task", expires=4.0, now=now) == ["h1", "h2"]
    assert sent == [("vms.tasks.vms_reconcile_task", "host.h1", 4.0), ("vms.tasks.vms_reconcile_task", "host.h2", 4.0)]


def test_it_refuses_a_task_that_is_not_per_host_periodic_work(db, sent) -> None:
    HostFactory(name="h1")
    with pytest.raises(ApplicationError):
        host_periodic_fanout(task_name="vms.tasks.operation_run_task", expires=4.0)
    assert sent == []


def test_beat_schedules_per_host_work_through_the_fanout_on_the_shared_queue() -> None:
    fanned = set()
    for entry in django_settings.CELERY_BEAT_SCHEDULE.values():
        assert entry["options"]["queue"] == "shared", entry  # never one host's queue only
        if entry["task"] == "vms.tasks.host_periodic_fanout_task":
            fanned.add(entry["args"][0])
    assert fanned == HOST_PERIODIC_TASKS
