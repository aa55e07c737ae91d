"""The SDK's endpoint table (sdk/src/msbx/_endpoints.py: every request the SDK makes goes
through it) against the server's OpenAPI schema, generated in-process as ``/api/schema/``
serves it: a path, method, body field, query parameter or read response field that the
schema does not have fails here."""

from __future__ import annotations

import re

import pytest
from drf_spectacular.generators import SchemaGenerator
from msbx._endpoints import ENDPOINTS, Endpoint


@pytest.fixture(scope="module")
def schema() -> dict:
    return SchemaGenerator().get_schema(request=None, public=True)


def _normal(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "{}", path)


def _resolve(schema: dict, node: dict | None) -> dict:
    while node and "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node or {}


def _properties(schema: dict, node: dict | None) -> set[str] | None:
    """Field names of an object schema; None when the schema leaves it free-form."""
    node = _resolve(schema, node)
    if node.get("type") == "array":
        return _properties(schema, node.get("items"))
    for combined in ("allOf", "oneOf", "anyOf"):
        if combined in node:
            names: set[str] = set()
            for part in node[combined]:
                names |= _properties(schema, part) or set()
            return names or None
    if "properties" in node:
        return set(node["properties"])
    return None


def contract_problems(endpoints: dict[str, Endpoint], schema: dict) -> list[str]:
    paths = {_normal(p): item for p, item in schema["paths"].items()}
    problems = []
    for name, ep in endpoints.items():
        item = paths.get(_normal(ep.path))
        if item is None:
            problems.append(f"{name}: no path {ep.path}")
            continue
        operation = item.get(ep.method.lower())
        if operation is None:
            problems.append(f"{name}: no {ep.method} on {ep.path}")
            continue
        params = {p["name"] for p in operation.get("parameters", []) if p.get("in") == "query"}
        for field in ep.query:
            if field not in params:
                problems.append(f"{name}: query parameter {field!r} not in the schema ({sorted(params)})")
        content = operation.get("requestBody", {}).get("content", {})
        if ep.raw_body and "application/octet-stream" not in content:
            problems.append(f"{name}: the schema takes no raw body")
        if ep.body:
            accepted = _properties(schema, content.get("application/json", {}).get("schema"))
            if accepted is None:
                problems.append(f"{name}: the schema declares no JSON body fields")
            else:
                problems += [f"{name}: body field {f!r} not in the schema" for f in ep.body if f not in accepted]
        if ep.reads:
            for status, response in operation.get("responses", {}).items():
                if not str(status).startswith("2"):
                    continue
                node = response.get("content", {}).get("application/json", {}).get("schema")
                resolved = _resolve(schema, node)
                if ep.paginated:
                    if "results" not in resolved.get("properties", {}):
                        problems.append(f"{name}: {status} is not a paginated list")
                        continue
                    node = resolved["properties"]["results"]
                fields = _properties(schema, node)
                if fields is None:
                    continue  # free-form in the schema: nothing to check against
                problems += [f"{name}: {status} has no field {f!r}" for f in ep.reads if f not in fields]
    return problems


def test_every_sdk_request_is_in_the_api_schema(schema):
    assert contract_problems(ENDPOINTS, schema) == []


def test_the_contract_check_catches_what_the_schema_does_not_have(schema):
    bogus = {
        "no_path": Endpoint("GET", "/api/v1/widgets/"),
        "no_method": Endpoint("PUT", "/api/v1/operations/{id}/"),
        "no_field": Endpoint("POST", "/api/v1/vms/", body=("name", "colour")),
        "no_param": Endpoint("GET", "/api/v1/vms/{id}/files/", query=("path", "offset")),
        "no_read": Endpoint("GET", "/api/v1/vms/{id}/", reads=("state", "mood")),
        "paged_read": Endpoint("GET", "/api/v1/vms/", reads=("name", "mood"), paginated=True),
    }
    problems = "\n".join(contract_problems(bogus, schema))
    for name, what in [
        ("no_path", "no path"),
        ("no_method", "no PUT"),
        ("no_field", "'colour'"),
        ("no_param", "'offset'"),
        ("no_read", "'mood'"),
        ("paged_read", "'mood'"),
    ]:
        assert f"{name}: " in problems and what in problems, (name, problems)


def test_the_websocket_paths_the_sdk_uses_are_routed():
    from django.urls.resolvers import URLPattern
    from msbx._endpoints import WS_EXEC, WS_EXEC_START

    from sandbox_site.routing import websocket_urlpatterns

    patterns = [p for p in websocket_urlpatterns if isinstance(p, URLPattern)]
    for path in (
        WS_EXEC.format(id="11111111-2222-3333-4444-555555555555", exec_id="e1"),
        WS_EXEC_START.format(id="11111111-2222-3333-4444-555555555555"),
        "/ws/vms/11111111-2222-3333-4444-555555555555/console/",
    ):
        assert any(p.resolve(path.lstrip("/")) for p in patterns), path


def test_an_exec_sockets_start_reply_gives_the_id_or_the_apis_error():
    import json

    import msbx
    from msbx._http import ws_start_reply

    path = "/ws/vms/x/exec/"
    assert ws_start_reply(json.dumps({"type": "started", "exec_id": "e1"}), path) == "e1"
    assert ws_start_reply(json.dumps({"type": "attached", "offset": 0}), path) is None
    assert ws_start_reply(b"\x01out", path) is None
    throttled = {"type": "error", "code": "throttled", "message": "slow down", "status": 429,
                 "details": {"retry_after": 7}}  # fmt: skip
    with pytest.raises(msbx.RateLimited) as limited:
        ws_start_reply(json.dumps(throttled), path)
    assert limited.value.retry_after == 7 and limited.value.status == 429
    invalid = {"type": "error", "code": "bad_request", "message": "no", "status": 400, "details": {"command": ["x"]}}
    with pytest.raises(msbx.ValidationError):
        ws_start_reply(json.dumps(invalid), path)


def test_an_exec_sockets_start_frame_leaves_out_what_the_rest_call_leaves_out():
    import json

    from msbx._http import ws_start_frame
    from msbx.models import exec_body

    body = exec_body("/bin/sh", env={"TERM": "xterm"}, wait=False, stdin_open=True, pty={"rows": 24, "cols": 80})
    frame = json.loads(ws_start_frame(body))
    assert frame == {
        "type": "start",
        "command": "/bin/sh",
        "env": {"TERM": "xterm"},
        "stdin_open": True,
        "pty": {"rows": 24, "cols": 80},
    }
