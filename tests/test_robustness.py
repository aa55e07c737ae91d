"""Malformed input never gets a 5xx, hangs a request or poisons stored data (issue 14): one
validation layer (sandbox_site/validation.py), the API's edges (sandbox_site/api_io.py) and
one place that turns exceptions into the error shape (sandbox_site/errors.py)."""

from __future__ import annotations

import json

import pytest
from channels.testing import WebsocketCommunicator

from accounts.audit import audit_chain_verify, audit_record
from accounts.models import AuditEvent
from networking import services as net_services
from sandbox_site.api_io import SafeJSONRenderer
from sandbox_site.asgi import application
from sandbox_site.validation import json_loads_checked
from tests.factories import VmFactory

pytestmark = pytest.mark.django_db

LISTS = ("/api/v1/vms/", "/api/v1/audit-events/", "/api/v1/operations/", "/api/v1/snapshots/", "/api/v1/networks/")


def error_of(response) -> dict:
    assert response["Content-Type"].startswith("application/json"), response.content[:200]
    body = response.json()
    assert set(body) == {"error"} and {"code", "message", "details"} <= set(body["error"]), body
    return body["error"]


@pytest.mark.parametrize("path", LISTS)
def test_it_bounds_limit_and_offset_on_every_list(api, owner, path):
    client = api.as_user(owner)
    VmFactory(owner=owner)
    huge = client.get(path, {"limit": str(2**63)})
    assert huge.status_code == 200, huge.content
    assert client.get(path, {"limit": "10" * 20, "offset": "3"}).status_code == 200
    for bad in ({"limit": "²"}, {"limit": "١٠"}, {"limit": "-1"}, {"offset": str(2**64)}, {"offset": "x"}):
        assert error_of(client.get(path, bad))["code"] == "invalid", bad


def test_a_page_is_at_most_the_maximum(api, owner, settings):
    from sandbox_site.pagination import ApiPagination

    settings.SANDBOX_PAGE_MAX = 7
    assert ApiPagination().max_limit == 7


@pytest.mark.parametrize(
    "body",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"a":' * 50 + "1" + "}" * 50,
        '{"name": NaN}',
        '{"name": Infinity}',
        '{"name": "\\ud800"}',
        '{"name": "a\\u0000b"}',
        "not json",
    ],
)
def test_malformed_json_bodies_are_a_400_in_the_error_shape(api, owner, body):
    response = api.as_user(owner).generic("POST", "/api/v1/vms/", body, content_type="application/json")
    assert response.status_code == 400
    assert error_of(response)["code"] == "parse_error"


def test_invalid_utf8_bodies_are_refused(api, owner):
    response = api.as_user(owner).generic("POST", "/api/v1/vms/", b'{"name": "\xff"}', content_type="application/json")
    assert response.status_code == 400 and error_of(response)["code"] == "parse_error"


def test_a_lone_surrogate_in_an_exec_command_writes_no_audit_row(api, owner, vm):
    before = AuditEvent.objects.count()
    body = '{"command": ["echo", "\\ud800"]}'
    response = api.as_user(owner).generic("POST", f"/api/v1/vms/{vm.pk}/exec/", body, content_type="application/json")
    assert response.status_code == 400
    assert AuditEvent.objects.count() == before


def test_the_audit_log_stores_text_escaped_and_always_renders(api, owner, operator):
    event = audit_record(
        actor=owner,
        action="vm.exec",
        object_type="vms.vm",
        object_id="x\x00y",
        after={"command": "echo \ud800", "k\x00": ["\udfff"]},
        message="bad \x00 \ud800",
    )
    event.refresh_from_db()
    assert event.message == "bad \ufffd \ufffd" and event.object_id == "x\ufffdy"
    assert event.after == {"command": "echo \ufffd", "k\ufffd": ["\ufffd"]}
    assert audit_chain_verify().ok
    assert api.as_user(operator).get("/api/v1/audit-events/").status_code == 200
    assert api.as_user(operator).get(f"/api/v1/audit-events/{event.pk}/").status_code == 200


def test_the_renderer_never_fails_on_text_that_is_not_utf8():
    rendered = SafeJSONRenderer().render({"message": "x\ud800y"})
    assert json.loads(rendered) == {"message": "x\ud800y"}


@pytest.mark.parametrize(
    "since", ["2026-13-01T00:00:00Z", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-12:00", "yesterday", "²"]
)
def test_bad_audit_dates_are_a_400(api, operator, since):
    for name in ("since", "until"):
        response = api.as_user(operator).get("/api/v1/audit-events/", {name: since})
        assert response.status_code == 400, (name, since)
        assert name in error_of(response)["details"]


def test_good_audit_dates_still_filter(api, operator):
    response = api.as_user(operator).get(
        "/api/v1/audit-events/", {"since": "2026-01-01T00:00:00", "until": "2100-01-01T00:00:00+14:00"}
    )
    assert response.status_code == 200


@pytest.fixture
def wired_vm(vm):
    net_services.nic_allocate(vm=vm)
    return vm


@pytest.mark.parametrize("ports", ["90-80", "0", "9" * 40, "٨٠", "80,", "1-65536"])
def test_bad_egress_ports_are_a_400(api, owner, wired_vm, ports):
    body = {"mode": "allowlist", "rules": [{"cidr": "10.0.0.0/8", "protocol": "tcp", "ports": ports}]}
    response = api.as_user(owner).put(f"/api/v1/vms/{wired_vm.pk}/egress/", body, format="json")
    assert response.status_code == 400, response.content
    assert error_of(response)["code"] == "invalid"


@pytest.mark.parametrize(
    "url", ["/api/v1/vms/?name=%00", "/api/v1/vms/%00/", "/api/v1/audit-events/?actor=a%00b", "/api/v1/vms/?name=%ff"]
)
def test_nul_and_non_utf8_in_paths_and_query_strings_are_a_400(api, owner, url):
    response = api.as_user(owner).get(url)
    assert response.status_code == 400 and error_of(response)["code"] == "invalid"


def test_non_uuid_ids_are_a_404(api, owner):
    for url in (
        "/api/v1/vms/nope/",
        "/api/v1/vms/nope/snapshots/",
        "/api/v1/operations/1/",
        "/api/v1/snapshots/%E2%80%A8/",
    ):
        response = api.as_user(owner).get(url)
        assert response.status_code == 404, url
        assert error_of(response)["code"] == "not_found"


def test_multipart_without_a_boundary_is_a_400_in_the_error_shape(api, owner):
    response = api.as_user(owner).generic("POST", "/api/v1/vms/", b"--x\r\n", content_type="multipart/form-data")
    assert response.status_code in (400, 415)
    error_of(response)


def test_a_body_over_the_memory_limit_is_a_413_in_the_error_shape(api, owner, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    body = json.dumps({"name": "x" * 5000, "template": "t"})
    response = api.as_user(owner).generic("POST", "/api/v1/vms/", body, content_type="application/json")
    assert response.status_code == 413
    assert error_of(response)["code"] == "too_large"


def test_too_many_query_fields_are_a_400_in_the_error_shape(api, owner):
    query = "&".join(f"f{i}=1" for i in range(1500))
    response = api.as_user(owner).get(f"/api/v1/vms/?{query}")
    assert response.status_code == 400
    error_of(response)


def test_json_loads_checked_is_iterative_and_strict():
    assert json_loads_checked(b'{"a": [1, {"b": "c"}]}') == {"a": [1, {"b": "c"}]}
    for raw in ("[" * 33 + "]" * 33, "[1e400]", '{"x": -Infinity}', '["\\udfff"]', '{"\\u0000": 1}'):
        with pytest.raises(Exception) as err:
            json_loads_checked(raw)
        assert getattr(err.value, "code", "") == "parse_error"


# ----- websockets: routing ----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", ["/ws/nope/", "/ws/vms/not-a-uuid/console/", "/", "/ws/vms/events/extra/"])
async def test_unknown_websocket_paths_close_with_4404(path, owner):
    comm = WebsocketCommunicator(application, path, headers=[(b"origin", b"http://localhost"), (b"host", b"localhost")])
    comm.scope["user"] = owner
    connected, _ = await comm.connect(timeout=5)
    assert connected
    out = await comm.receive_output(timeout=5)
    assert out == {"type": "websocket.close", "code": 4404}
    await comm.wait(timeout=5)


def test_malformed_port_forward_ids_are_a_404(api, owner, vm):
    client = api.as_user(owner)
    for pk in ("%C2%B2", "9" * 40, "-1", "1.5"):
        response = client.delete(f"/api/v1/vms/{vm.pk}/port-forwards/{pk}/")
        assert response.status_code == 404, (pk, response.content)
