"""Schemathesis against the real stack (issue 14): every operation of /api/schema/, as an
ordinary user, with the examples, coverage, fuzzing and stateful phases; the run fails on any
5xx (``not_a_server_error``) or any response that does not match its documented schema
(``response_schema_conformance``). Bounded (``MAX_EXAMPLES`` per operation, ``MAX_SECONDS``)
so the stage stays within a few minutes on two cores.

VMs stay cheap: the fuzzing user's quota is one VM, which the stage boots first. Operations
that would boot, stop or snapshot VMs are left out of generation (they would only meet the
quota, or churn that VM) and are called once each against that VM below, their answers
checked against the schema the same way. The VM's nested endpoints (exec, files, NICs, port
forwards, retention) are generated against that running VM, so they reach its guest agent.

Needs schemathesis (the ``dev`` extra); the report (NDJSON, JUnit) is kept in
test-artifacts/system/schemathesis/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.system.stack import ROOT

pytestmark = pytest.mark.vm

MAX_EXAMPLES = int(os.environ.get("SANDBOX_SCHEMATHESIS_EXAMPLES", "8"))
MAX_SECONDS = int(os.environ.get("SANDBOX_SCHEMATHESIS_SECONDS", "240"))

# Generated against random ids they only meet 404s, against the fuzzer's VM they would boot,
# stop or snapshot it: called once each in ``test_vm_booting_operations_match_the_schema``.
VM_BOOTING = (
    r"^POST /api/v1/vms/$",
    r"^PATCH /api/v1/vms/\{id\}/$",
    r"^DELETE /api/v1/vms/\{id\}/$",
    r"^POST /api/v1/vms/\{id\}/(start|stop|reboot|pause|resume)/$",
    r"^POST /api/v1/vms/\{vm_id\}/snapshots/$",
    r"^POST /api/v1/snapshots/\{id\}/(restore|clone)/$",
    r"^DELETE /api/v1/snapshots/\{id\}/$",
)
# Revoking its own token would end the run early.
SELF_DEFEATING = (r"^DELETE /api/v1/tokens/\{id\}/$",)

_FUZZER = """
import json
from accounts.models import UserQuota
from accounts.services import token_create, user_set_role
from django.contrib.auth import get_user_model
user = get_user_model().objects.create_user(username="fuzzer", password="fuzzer-password-1")
user_set_role(user=user, role="user", actor=None)
UserQuota.objects.create(user=user, max_vms=1, max_vcpus=1, max_memory_mib=512, max_disk_gib=2)
print("TOKEN=" + token_create(user=user, name="schemathesis", actor=user)[1])
"""


def _schemathesis_available() -> bool:
    return subprocess.run([sys.executable, "-c", "import schemathesis"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def fuzzer(stack) -> dict:
    if not _schemathesis_available():
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    seeded = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", _FUZZER],
        cwd=ROOT,
        env=stack.env,
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    )
    token = seeded.stdout.split("TOKEN=", 1)[1].strip()
    stack.tokens["fuzzer"] = token
    with stack.client("fuzzer") as client:
        created = client.post("/api/v1/vms/", json={"name": "fuzzed", "template": "linux-small"})
        assert created.status_code == 202, created.text
    vm = stack.wait_vm(created.json()["id"], {"running"}, persona="fuzzer")
    return {"token": token, "vm": vm}


def _config(path: Path, vm_id: str) -> Path:
    # The VM's nested endpoints get the running VM's id; everything else random ids.
    path.write_text(
        "\n".join(
            [
                "[[operations]]",
                'include-path-regex = "^/api/v1/vms/\\\\{vm_id\\\\}/(exec|execs|files/stat|files/list|files/mkdir|'
                'nics|port-forwards|snapshot-retention|snapshots)/"',
                f'parameters = {{ "path.vm_id" = "{vm_id}" }}',
                "",
            ]
        )
    )
    return path


def test_the_api_answers_every_generated_request_as_documented(stack, fuzzer):
    report_dir = Path(os.environ.get("SANDBOX_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "system" / "schemathesis"
    report_dir.mkdir(parents=True, exist_ok=True)
    config = _config(report_dir / "schemathesis.toml", fuzzer["vm"]["id"])
    excluded = "|".join(f"({pattern[1:-1]})" for pattern in (*VM_BOOTING, *SELF_DEFEATING))
    argv = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        f"{stack.url}/api/schema/",
        "-H",
        f"Authorization: Bearer {fuzzer['token']}",
        "--checks",
        "not_a_server_error,response_schema_conformance",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--max-time",
        str(MAX_SECONDS),
        # One worker: with two, CPython 3.11's ast module (hypothesis parses strategy lambdas)
        # sometimes fails with "AST constructor recursion depth mismatch" (cpython gh-106905),
        # a tool error that is no finding about the API.
        "--workers",
        "1",
        "--request-timeout",
        "60",
        "--exclude-name-regex",
        f"^({excluded})$",
        "--seed",
        "14",
        "--report",
        "junit,ndjson",
        "--report-dir",
        str(report_dir),
        "--no-color",
    ]
    started = time.monotonic()
    run = subprocess.run(argv, cwd=report_dir, capture_output=True, text=True, timeout=MAX_SECONDS + 300)
    (report_dir / "output.txt").write_text(run.stdout + run.stderr)
    elapsed = time.monotonic() - started
    assert run.returncode == 0, f"schemathesis found failures in {elapsed:.0f}s:\n{run.stdout[-6000:]}"
    assert "generated" in run.stdout


def _schema_operations(stack, token: str):
    import schemathesis

    return schemathesis.openapi.from_url(f"{stack.url}/api/schema/", headers={"Authorization": f"Bearer {token}"})


def test_vm_booting_operations_match_the_schema(stack, fuzzer):
    """The operations left out of generation, once each against the fuzzer's VM (or its quota)."""
    schema = _schema_operations(stack, fuzzer["token"])
    vm_id = fuzzer["vm"]["id"]
    absent = "00000000-0000-0000-0000-000000000000"
    calls = [
        ("POST", "/api/v1/vms/", "/api/v1/vms/", {"name": "second", "template": "linux-small"}),  # quota: 403
        ("PATCH", "/api/v1/vms/{id}/", f"/api/v1/vms/{vm_id}/", {"metadata": {"k": "v"}}),
        ("POST", "/api/v1/vms/{id}/pause/", f"/api/v1/vms/{vm_id}/pause/", {}),
        ("POST", "/api/v1/vms/{id}/resume/", f"/api/v1/vms/{vm_id}/resume/", {}),
        ("POST", "/api/v1/vms/{id}/start/", f"/api/v1/vms/{vm_id}/start/", {}),  # running: 409
        ("POST", "/api/v1/vms/{vm_id}/snapshots/", f"/api/v1/vms/{vm_id}/snapshots/", {"name": "s1"}),
        (
            "POST",
            "/api/v1/snapshots/{id}/restore/",
            f"/api/v1/snapshots/{absent}/restore/",
            {},
        ),
        ("POST", "/api/v1/snapshots/{id}/clone/", f"/api/v1/snapshots/{absent}/clone/", {}),
        ("DELETE", "/api/v1/snapshots/{id}/", f"/api/v1/snapshots/{absent}/", None),
        ("POST", "/api/v1/vms/{id}/stop/", f"/api/v1/vms/{vm_id}/stop/", {}),
        ("DELETE", "/api/v1/vms/{id}/", f"/api/v1/vms/{vm_id}/", None),
    ]
    with stack.client("fuzzer") as client:
        for method, template, url, body in calls:
            if method == "POST" and template.endswith("/resume/"):
                _wait_idle(client, vm_id)
            response = client.request(method, url, json=body) if body is not None else client.request(method, url)
            assert response.status_code < 500, (method, url, response.text)
            operation = schema[template][method]
            _validate(operation, response)
            if template.endswith(("/pause/", "/snapshots/", "/stop/")) and response.status_code == 202:
                _wait_idle(client, vm_id)


def _wait_idle(client, vm_id: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/api/v1/vms/{vm_id}/").json()
        if body.get("state") in ("running", "paused", "stopped", "error"):
            return
        time.sleep(0.5)


def _validate(operation, response) -> None:
    """The response against its documented schema (schemathesis's own conformance check)."""
    operation.validate_response(response)  # raises on a mismatch
    json.loads(response.content or b"null")  # every answer here is JSON
