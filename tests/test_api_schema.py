"""The OpenAPI schema tells the truth about the shapes the API answers (issue 14); the
schemathesis stage (tests/system/test_schemathesis.py) checks every operation against the real
stack, these the lies it once found, fast."""

from __future__ import annotations

import pytest
from drf_spectacular.generators import SchemaGenerator

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def schema():
    return SchemaGenerator().get_schema(request=None, public=True)


def _ref(schema, content) -> dict:
    item = content["application/json"]["schema"]
    if "items" in item:
        item = item["items"]
    name = item["$ref"].rsplit("/", 1)[-1]
    return schema["components"]["schemas"][name]


def _response(schema, path, method, status="200") -> dict:
    return _ref(schema, schema["paths"][path][method]["responses"][status]["content"])


def test_a_shared_network_has_a_null_owner_and_users_may_have_no_email(schema):
    assert schema["components"]["schemas"]["Network"]["properties"]["owner"].get("nullable") is True
    assert "format" not in schema["components"]["schemas"]["User"]["properties"]["email"]


def test_retention_answers_always_carry_updated_at(schema, api, owner, vm):
    for path in ("/api/v1/snapshot-retention/", "/api/v1/vms/{vm_id}/snapshot-retention/"):
        body = _response(schema, path, "get")
        assert "updated_at" in body["required"] and body["properties"]["updated_at"].get("nullable")
    client = api.as_user(owner)
    empty = {"keep_last": None, "keep_days": None, "updated_at": None}
    assert client.get("/api/v1/snapshot-retention/").json() == empty
    got = client.get(f"/api/v1/vms/{vm.pk}/snapshot-retention/").json()
    assert got == {**empty, "scope": None}


@pytest.mark.parametrize(
    "path, method, status, name",
    [
        ("/api/v1/vms/{id}/permissions/", "get", "200", "VmPermissions"),
        ("/api/v1/vms/{id}/samples/", "get", "200", "VmSamples"),
        ("/api/v1/vms/{vm_id}/egress/", "put", "200", "VmEgressResult"),
        ("/api/v1/vms/{id}/console-ticket/", "post", "201", "ConsoleTicket"),
        ("/api/v1/snapshots/{id}/", "delete", "202", "Snapshot"),
    ],
)
def test_actions_document_their_own_shapes_not_the_viewsets(schema, path, method, status, name):
    content = schema["paths"][path][method]["responses"][status]["content"]
    assert content["application/json"]["schema"]["$ref"].endswith("/" + name)


def test_the_agent_ping_and_exec_detail_are_objects_not_a_vm_or_a_request(schema):
    for path in ("/api/v1/vms/{id}/agent/", "/api/v1/vms/{vm_id}/execs/{exec_id}/"):
        body = schema["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert body.get("type") == "object" and "$ref" not in body, path


def test_a_nic_egress_mode_may_be_empty(schema):
    mode = schema["components"]["schemas"]["Nic"]["properties"]["egress_mode"]
    assert "enum" not in mode and "$ref" not in mode and "allOf" not in mode


def test_every_operation_documents_errors_in_the_error_shape(schema):
    assert schema["components"]["schemas"]["Error"]["required"] == ["error"]
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            for status in ("400", "401", "403", "404", "default"):
                ref = operation["responses"][status]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/Error"), (method, path, status)


def test_page_bounds_are_in_the_schema(schema):
    parameters = {p["name"]: p["schema"] for p in schema["paths"]["/api/v1/vms/"]["get"]["parameters"]}
    assert parameters["limit"]["minimum"] == 1 and parameters["offset"]["minimum"] == 0


def test_the_vm_list_documents_its_state_and_name_filters(schema):
    params = {p["name"]: p for p in schema["paths"]["/api/v1/vms/"]["get"]["parameters"] if p["in"] == "query"}
    assert "running" in params["state"]["schema"]["enum"]
    assert "name" in params and "case-insensitive" in params["name"]["description"]


def test_the_vm_list_filters_by_name_and_state_and_the_detail_ignores_them(api, owner, stranger):
    from tests.factories import VmFactory

    web = VmFactory(owner=owner, name="web", state="running")
    VmFactory(owner=owner, name="web-2", state="stopped")
    VmFactory(owner=owner, name="db", state="running")
    VmFactory(owner=stranger, name="web")  # not visible to owner
    client = api.as_user(owner)

    def names(query):
        response = client.get(f"/api/v1/vms/?{query}")
        assert response.status_code == 200
        return sorted(vm["name"] for vm in response.json()["results"])

    assert names("name=WEB") == ["web", "web-2"]
    assert names("name=web&state=running") == ["web"]
    assert names("state=stopped") == ["web-2"]
    assert client.get(f"/api/v1/vms/{web.pk}/?name=db&state=stopped").json()["name"] == "web"
