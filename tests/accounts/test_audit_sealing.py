"""Sealing audit rows into the chain. These tests run inside one test transaction, which never
commits, so the after-commit sealer does not run: rows stay unsealed until a test seals them
the way the periodic task does."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import transaction

from accounts.audit import audit_chain_seal, audit_chain_verify, audit_record
from accounts.models import AuditEvent
from accounts.tasks import audit_chain_seal_task


def _record(owner, n):
    return audit_record(actor=owner, action="test.event", object_type="test", object_id=str(n), after={"n": n})


def test_rows_are_written_unsealed_and_the_periodic_task_seals_them(owner):
    rows = [_record(owner, n) for n in range(3)]
    assert all(row.chain_seq is None and row.hash == "" for row in AuditEvent.objects.all())
    report = audit_chain_verify()
    assert report.ok and report.checked == 0 and report.unsealed == 3
    audit_chain_seal_task()
    sealed = list(AuditEvent.objects.order_by("chain_seq"))
    assert [row.pk for row in sealed] == [row.pk for row in rows] and [row.chain_seq for row in sealed] == [1, 2, 3]
    report = audit_chain_verify()
    assert report.ok and report.checked == 3 and report.unsealed == 0
    _record(owner, 3)
    assert audit_chain_seal() == 1 and audit_chain_seal() == 0
    assert audit_chain_verify().checked == 4


def test_fresh_unsealed_rows_are_reported_and_not_a_failure(owner, capsys):
    _record(owner, 0)
    audit_chain_seal()
    _record(owner, 1)
    call_command("audit_verify")
    assert capsys.readouterr().out.strip() == "Audit chain intact: 1 events verified. 1 newer event(s) not sealed yet."


def test_a_row_left_unsealed_too_long_fails_verification(owner, settings):
    _record(owner, 0)
    audit_chain_seal()
    stuck = _record(owner, 1)
    old = stuck.created_at - timedelta(seconds=settings.SANDBOX_AUDIT_SEAL_GRACE_SECONDS + 1)
    AuditEvent.objects.filter(pk=stuck.pk).update(created_at=old)
    report = audit_chain_verify()
    assert not report.ok and report.broken_id == stuck.pk and report.checked == 1 and report.unsealed == 1
    assert "not sealed into the chain" in report.reason
    with pytest.raises(CommandError, match=f"event id {stuck.pk}: 1 row"):
        call_command("audit_verify")
    audit_chain_seal()
    assert audit_chain_verify().ok


def test_reordering_sealed_rows_is_detected(owner):
    for n in range(4):
        _record(owner, n)
    audit_chain_seal()
    second, third = AuditEvent.objects.filter(chain_seq__in=(2, 3)).order_by("chain_seq")
    AuditEvent.objects.filter(pk=second.pk).update(chain_seq=-1)
    AuditEvent.objects.filter(pk=third.pk).update(chain_seq=2)
    AuditEvent.objects.filter(pk=second.pk).update(chain_seq=3)
    report = audit_chain_verify()
    assert not report.ok and report.broken_id == third.pk and report.checked == 1


def test_unsealing_a_sealed_row_is_detected(owner):
    for n in range(3):
        _record(owner, n)
    audit_chain_seal()
    middle = AuditEvent.objects.get(chain_seq=2)
    AuditEvent.objects.filter(pk=middle.pk).update(chain_seq=None, prev_hash="", hash="")
    report = audit_chain_verify()
    assert not report.ok and report.broken_id == AuditEvent.objects.get(chain_seq=3).pk


def test_a_rolled_back_action_leaves_no_row_and_no_gap(owner):
    _record(owner, 0)
    with pytest.raises(RuntimeError), transaction.atomic():
        _record(owner, 1)
        raise RuntimeError("the action failed")
    _record(owner, 2)
    audit_chain_seal()
    assert list(AuditEvent.objects.order_by("chain_seq").values_list("chain_seq", "object_id")) == [(1, "0"), (2, "2")]
    assert audit_chain_verify().ok


def test_the_api_lists_newest_first_unsealed_rows_before_sealed_ones(api, operator):
    for n in range(2):
        _record(operator, n)
    audit_chain_seal()
    _record(operator, 2)
    results = api.as_user(operator).get("/api/v1/audit-events/?action=test.event").json()["results"]
    assert [(r["object_id"], r["chain_seq"]) for r in results] == [("2", None), ("1", 2), ("0", 1)]


def test_the_admin_lists_events_in_chain_order_and_filters_unsealed_ones(admin_user, owner):
    from django.test import Client

    from tests.factories import PASSWORD

    for n in range(2):
        _record(owner, n)
    audit_chain_seal()
    pending = _record(owner, 2)
    client = Client()
    assert client.login(username=admin_user.username, password=PASSWORD)
    page = client.get("/admin/accounts/auditevent/")
    assert page.status_code == 200
    assert [e.pk for e in page.context["cl"].result_list][:3] == [
        pending.pk,
        *AuditEvent.objects.filter(chain_seq__isnull=False).order_by("-chain_seq").values_list("pk", flat=True),
    ][:3]
    unsealed = client.get("/admin/accounts/auditevent/?chain_seq__isempty=1")
    assert [e.pk for e in unsealed.context["cl"].result_list] == [pending.pk]


def test_metrics_show_how_long_the_oldest_row_has_waited_for_its_seal(owner):
    import re

    from django.test import Client

    def scraped() -> float:
        body = Client(REMOTE_ADDR="127.0.0.1").get("/metrics").content.decode()
        return float(re.search(r"^msbx_audit_oldest_unsealed_seconds (\S+)$", body, re.M).group(1))

    assert scraped() == 0
    stuck = _record(owner, 0)
    AuditEvent.objects.filter(pk=stuck.pk).update(created_at=stuck.created_at - timedelta(hours=1))
    assert scraped() >= 3600
    audit_chain_seal()
    assert scraped() == 0


@pytest.mark.django_db(transaction=True)
def test_rows_of_a_request_are_sealed_once_its_response_is_out_and_elsewhere_at_commit(owner):
    # In a request the sealer's statements wait until Django closes the response (after its
    # last byte was sent); the row itself is committed before the response exists.
    from django.http import HttpResponse
    from django.test import RequestFactory

    from accounts.middleware import RequestContextMiddleware

    during = []

    def view(request):
        row = _record(owner, 1)  # autocommit: committed here
        during.append(AuditEvent.objects.get(pk=row.pk).chain_seq)
        return HttpResponse("ok")

    response = RequestContextMiddleware(view)(RequestFactory().get("/"))
    assert during == [None] and AuditEvent.objects.get().chain_seq is None
    response.close()
    assert AuditEvent.objects.get().chain_seq == 1 and audit_chain_verify().ok
    _record(owner, 2)  # outside a request: sealed at commit
    assert AuditEvent.objects.get(object_id="2").chain_seq == 2


@pytest.mark.django_db(transaction=True)
def test_a_web_process_seals_the_rows_of_a_moment_together_a_moment_after_their_responses(owner, settings, monkeypatch):
    # The process's sealer thread: one sealing pass for the requests of the delay, not one each.
    import threading

    from django.http import HttpResponse
    from django.test import RequestFactory

    from accounts import audit
    from accounts.middleware import RequestContextMiddleware

    settings.SANDBOX_AUDIT_SEAL_DELAY_SECONDS = 3.0  # far longer than five requests take
    passes = []
    done = threading.Event()
    real_seal = audit.audit_chain_seal

    def counting_seal(**kwargs):
        sealed = real_seal(**kwargs)
        passes.append(sealed)
        done.set()
        return sealed

    monkeypatch.setattr(audit, "audit_chain_seal", counting_seal)

    def view(request):
        _record(owner, request.GET["n"])
        return HttpResponse("ok")

    for n in range(5):
        response = RequestContextMiddleware(view)(RequestFactory().get(f"/?n={n}"))
        response.close()  # the response is out: the request's part is done
    assert AuditEvent.objects.filter(chain_seq__isnull=True).count() == 5  # nothing sealed in the requests
    assert done.wait(30), "the sealer thread did not seal"
    assert passes == [5]
    in_chain = AuditEvent.objects.order_by("chain_seq").values_list("object_id", flat=True)
    assert list(in_chain) == ["0", "1", "2", "3", "4"]
    assert audit_chain_verify().ok
