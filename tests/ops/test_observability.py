"""Logs with request/user/VM/operation ids (also through Celery task headers), /metrics and
its protection, /healthz and /readyz, the operator pages and the audit export."""

from __future__ import annotations

import io
import json
import logging
from types import SimpleNamespace

import pytest
from django.core.management import call_command
from django.test import Client

from accounts.audit import audit_record
from accounts.context import actor_context
from sandbox_site import health, logs
from vms.hostd.logcontext import JsonFormatter, LogContextFilter, log_context, log_ids


def _json_handler(stream: io.StringIO) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    handler.addFilter(LogContextFilter())
    handler.setFormatter(JsonFormatter())
    return handler


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_lines_carry_the_context_ids():
    stream = io.StringIO()
    logger = logging.getLogger("msbx.test.json")
    logger.addHandler(handler := _json_handler(stream))
    logger.setLevel(logging.INFO)
    try:
        with actor_context(request_id="req123"), log_context(vm_id="vm-1", operation_id="op-1"):
            logger.info("inside %s", "it")
        logger.info("outside")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    inside, outside, failed = _lines(stream)
    assert inside["msg"] == "inside it" and inside["level"] == "INFO" and inside["logger"] == "msbx.test.json"
    assert (inside["request_id"], inside["vm_id"], inside["operation_id"]) == ("req123", "vm-1", "op-1")
    assert "request_id" not in outside and "vm_id" not in outside
    assert "ValueError: boom" in failed["exc"]


def test_production_settings_log_json_lines(settings):
    assert settings.LOG_FORMAT == "json"  # DEBUG is off in the tests, as in production
    assert settings.LOGGING["handlers"]["console"]["formatter"] == "json"


def test_request_lines_carry_the_request_id_and_the_resolved_user(api, owner, vm):
    stream = io.StringIO()
    logger = logging.getLogger("django.request")
    handler = _json_handler(stream)
    captured: list[dict] = []
    original = JsonFormatter.format

    def keep(self, record):  # formatted while the request is handled: its ids are live
        line = original(self, record)
        captured.append(json.loads(line))
        return line

    handler.setFormatter(type("Keep", (JsonFormatter,), {"format": keep})())
    logger.addHandler(handler)
    try:
        response = api.as_user(owner).get("/api/v1/vms/00000000-0000-0000-0000-000000000000/")
    finally:
        logger.removeHandler(handler)
    assert response.status_code == 404
    warnings = [line for line in captured if line["logger"] == "django.request"]
    assert warnings, captured
    assert warnings[0]["request_id"] == response["X-Request-ID"]
    assert warnings[0]["user"] == "owner"
    assert warnings[0]["vm_id"] == "00000000-0000-0000-0000-000000000000"  # the VM the URL names


def test_the_request_id_travels_to_celery_tasks_in_their_headers():
    headers: dict = {}
    with actor_context(request_id="abc123"), log_context(user="owner"):
        logs._task_headers_add(headers=headers)
    assert headers == {"msbx_request_id": "abc123", "msbx_user": "owner"}

    request = SimpleNamespace(get=lambda key, default=None: headers.get(key, default))
    logs._task_context_enter(task_id="t1", task=SimpleNamespace(request=request))
    try:
        assert log_ids().items() >= {"request_id": "abc123", "user": "owner", "task_id": "t1"}.items()
        from accounts.context import current_context

        assert current_context().request_id == "abc123"  # audit rows of the task carry it too
    finally:
        logs._task_context_exit(task_id="t1")
    assert "task_id" not in log_ids() and not log_ids().get("request_id")


def test_hostd_requests_carry_the_request_id():
    from vms.hostd.client import _request_header

    assert "request" not in _request_header(1, "hello", {})
    with actor_context(request_id="r9"):
        assert _request_header(2, "hello", {})["request"] == "r9"


# --- metrics -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_metrics_answer_loopback_clients_only_without_a_token(settings, vm):
    local = Client(REMOTE_ADDR="127.0.0.1").get("/metrics")
    assert local.status_code == 200
    body = local.content.decode()
    assert 'msbx_vms{driver="' in body and "msbx_http_requests_total" in body and "msbx_host_up" in body
    assert Client(REMOTE_ADDR="203.0.113.9").get("/metrics").status_code == 403


@pytest.mark.django_db
def test_metrics_need_the_bearer_token_when_one_is_set(settings):
    settings.SANDBOX_METRICS_TOKEN = "s3cret-token"
    client = Client(REMOTE_ADDR="127.0.0.1")
    assert client.get("/metrics").status_code == 403
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-token").status_code == 200


@pytest.mark.django_db
def test_quota_denials_are_counted(owner, settings):
    from prometheus_client import REGISTRY

    from vms import services
    from vms.models import Template

    settings.SANDBOX_DEFAULT_QUOTA = {**settings.SANDBOX_DEFAULT_QUOTA, "max_memory_mib": 64}
    template = Template.objects.get(name="linux-small")
    before = REGISTRY.get_sample_value("msbx_quota_denials_total", {"resource": "memory_mib"}) or 0
    with pytest.raises(Exception, match="resource limits"):
        services.vm_limits_check(owner=owner, template=template, vcpus=1, memory_mib=128, disk_gib=template.disk_gib)
    assert REGISTRY.get_sample_value("msbx_quota_denials_total", {"resource": "memory_mib"}) == before + 1


# --- health --------------------------------------------------------------------------------


def test_healthz_answers_without_touching_anything():
    response = Client().get("/healthz")
    assert response.status_code == 200 and response.json() == {"ok": True}


@pytest.mark.django_db
def test_readyz_lists_each_check_and_answers_503_when_one_fails(settings, tmp_path):
    settings.SANDBOX_HOSTD_SOCKET = tmp_path / "absent.sock"
    response = Client().get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["ready"] is False
    assert set(body["checks"]) == {"database", "redis", "hostd", "disk", "image"}
    assert body["checks"]["database"]["ok"] is True and body["checks"]["redis"]["ok"] is True
    assert body["checks"]["hostd"]["ok"] is False and "absent.sock" in body["checks"]["hostd"]["detail"]


@pytest.mark.django_db
def test_readyz_is_ready_when_every_check_passes(monkeypatch):
    monkeypatch.setattr(health, "CHECKS", {name: (lambda: "fine") for name in health.CHECKS})
    response = Client().get("/readyz")
    assert response.status_code == 200 and response.json()["ready"] is True


@pytest.mark.django_db
def test_readyz_fails_when_the_data_directory_is_nearly_full(settings):
    settings.SANDBOX_READY_MIN_FREE_BYTES = 1 << 60
    assert health.readiness_checks()["disk"]["ok"] is False


# --- operator pages ----------------------------------------------------------------------


def test_operators_see_the_hosts_and_system_pages(client, operator, owner, vm):
    from tests.factories import PASSWORD

    client.login(username=operator.username, password=PASSWORD)
    hosts = client.get("/hosts/")
    assert hosts.status_code == 200 and b'data-host="local"' in hosts.content
    system = client.get("/system/")
    assert system.status_code == 200 and b'data-check="database"' in system.content
    client.logout()
    client.login(username=owner.username, password=PASSWORD)
    assert client.get("/hosts/").status_code == 403
    assert client.get("/system/").status_code == 403


# --- audit export -------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)  # rows are exported once sealed, after their commit
def test_audit_export_writes_json_lines_in_chain_order(owner, tmp_path):
    with actor_context(request_id="exp1"):
        for n in range(3):
            audit_record(actor=owner, action=f"test.event{n}", object_type="t", object_id=str(n))
    out = tmp_path / "audit.jsonl"
    call_command("audit_export", "--since", "1h", "-o", str(out), stderr=io.StringIO())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ours = [r for r in rows if r["action"].startswith("test.event")]
    assert [r["action"] for r in ours] == ["test.event0", "test.event1", "test.event2"]
    assert ours[0]["request_id"] == "exp1" and ours[0]["actor_username"] == "owner" and len(ours[0]["hash"]) == 64
    assert ours[1]["prev_hash"] == ours[0]["hash"] and ours[1]["chain_seq"] == ours[0]["chain_seq"] + 1
    resumed = io.StringIO()
    call_command("audit_export", "--after-seq", str(ours[1]["chain_seq"]), stdout=resumed, stderr=io.StringIO())
    assert [json.loads(line)["action"] for line in resumed.getvalue().splitlines()] == ["test.event2"]
    later = io.StringIO()
    call_command("audit_export", "--after-id", str(ours[1]["id"]), stdout=later, stderr=io.StringIO())
    assert [json.loads(line)["action"] for line in later.getvalue().splitlines()][-1] == "test.event2"
    assert all(json.loads(line)["id"] > ours[1]["id"] for line in later.getvalue().splitlines())
