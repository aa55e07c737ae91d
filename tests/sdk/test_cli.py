"""The ``msbx`` CLI against the in-process fake API: tables and JSON, exit codes, one-line
errors, --debug's request id, exec's exit status, login's private config file, completion."""

from __future__ import annotations

import json
import stat

import msbx
import pytest
from msbx import _http, cli

from tests.sdk.fake import TOKEN, URL, FakeApi, answer, error
from tests.sdk.test_client import VM, VM_ID, _exec_routes, _page, vm_list_answer


@pytest.fixture
def api(monkeypatch, tmp_path):
    fake = FakeApi()
    real_client = msbx.Client

    def client(*args, **kwargs):
        kwargs["transport"] = fake.sync_transport()
        kwargs["backoff"] = 0
        return real_client(*args, **kwargs)

    monkeypatch.setattr(cli, "Client", client)
    monkeypatch.setattr(_http.time, "sleep", lambda s: None)
    monkeypatch.setenv("MSBX_URL", URL)
    monkeypatch.setenv("MSBX_TOKEN", TOKEN)
    monkeypatch.setenv("MSBX_CONFIG", str(tmp_path / "config.json"))
    monkeypatch.delenv("MSBX_PROFILE", raising=False)
    return fake


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_vm_ls_prints_a_table_or_json(api, capsys):
    api.route("GET", "/api/v1/vms/", vm_list_answer([VM]))
    code, out, _ = run(capsys, "vm", "ls")
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["ID", "NAME", "STATE", "VCPUS", "MEMORY_MIB", "TEMPLATE", "OWNER"]
    assert row.split()[:3] == [VM_ID, "box", "running"]
    code, out, _ = run(capsys, "vm", "ls", "-o", "json")
    assert json.loads(out) == [VM]
    code, out, _ = run(capsys, "-o", "json", "vm", "ls", "--state", "stopped")
    assert json.loads(out) == []


def test_errors_are_one_line_with_an_exit_code_and_debug_shows_the_request_id(api, capsys):
    api.route("GET", "/api/v1/vms/.*", error(404, "not_found", "Not found."))
    api.route("GET", "/api/v1/vms/", {"count": 0, "next": None, "results": []})
    code, out, err = run(capsys, "vm", "show", "nope")
    assert code == 5 and out == "" and err.count("\n") == 1 and err.startswith("msbx: error: no VM 'nope'")
    # A name is looked up with the list's filter, never as an id (a 404 logged on the server).
    assert [r.url.path for r in api.requests] == ["/api/v1/vms/"]
    api.route("POST", "/api/v1/vms/.*/start/", error(409, "vm_not_running", "The VM is busy."))
    api.route("GET", f"/api/v1/vms/{VM_ID}/", VM)
    code, _, err = run(capsys, "--debug", "vm", "start", VM_ID)
    assert code == 6 and "msbx: error: The VM is busy. (vm_not_running, HTTP 409)" in err
    assert "request-id=req123" in err and "msbx: debug: request-id req123" in err


@pytest.mark.parametrize(
    ("status", "code", "exit_code"),
    [(400, "invalid", 2), (401, "not_authenticated", 3), (403, "permission_denied", 4), (403, "quota_exceeded", 7)],
)
def test_exit_codes_follow_the_error_class(api, capsys, status, code, exit_code):
    api.route("POST", "/api/v1/vms/", error(status, code, "no"))
    assert run(capsys, "vm", "create", "--template", "t", "--no-wait")[0] == exit_code


def test_a_missing_configuration_is_a_usage_error(api, capsys, monkeypatch):
    monkeypatch.delenv("MSBX_URL")
    code, _, err = run(capsys, "vm", "ls")
    assert code == 2 and "msbx login" in err


def test_exec_streams_and_exits_with_the_commands_status(api, capsys):
    _exec_routes(
        api,
        [_page(0, [("stdout", b"out\n"), ("stderr", b"err\n")], running=False, result={"exit_code": 4})],
    )
    code, out, err = run(capsys, "exec", VM_ID, "--", "sh", "-c", "exit 4")
    assert (code, out, err) == (4, "out\n", "err\n")
    assert api.body(api.calls("POST", "/exec/")[0])["command"] == ["sh", "-c", "exit 4"]
    _exec_routes(api, [_page(0, [], running=False, result={"exit_code": None, "signal": "SIGKILL"})])
    assert run(capsys, "exec", VM_ID, "--", "sleep 9")[0] == 128 + 9
    _exec_routes(api, [_page(0, [], running=False, result={"exit_code": None, "timed_out": True})])
    assert run(capsys, "exec", "--cmd-timeout", "1", VM_ID, "--", "sleep 9")[0] == 124


def test_vm_actions_wait_for_the_operation(api, capsys):
    api.route("GET", f"/api/v1/vms/{VM_ID}/", VM)
    api.route("POST", f"/api/v1/vms/{VM_ID}/stop/", answer(202, {"id": "op-1", "status": "queued"}))
    api.route(
        "GET", "/api/v1/operations/op-1/", [{"id": "op-1", "status": "running"}, {"id": "op-1", "status": "failed"}]
    )
    code, _, err = run(capsys, "vm", "stop", "--force", VM_ID)
    assert code == 12 and "failed" in err
    assert api.body(api.calls("POST", "/stop/")[0]) == {"force": True}
    code, out, _ = run(capsys, "vm", "stop", VM_ID, "--no-wait", "-o", "json")
    assert code == 0 and json.loads(out)["id"] == "op-1"


def test_login_writes_a_private_profile(api, capsys, tmp_path):
    api.route("GET", "/api/v1/users/me/", {"username": "ada"})
    code, out, _ = run(capsys, "login", "--url", URL, "--token", TOKEN, "--profile", "lab")
    assert code == 0 and "as ada" in out
    path = tmp_path / "config.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"default": "lab", "profiles": {"lab": {"url": URL, "token": TOKEN}}}


def test_completion_scripts_name_every_command(capsys):
    for shell in ("bash", "zsh"):
        code, out, _ = run(capsys, "completion", shell)
        assert code == 0 and "_msbx_complete" in out
        for word in ("vm", "exec", "console", "cp", "snapshot", "port-forward", "ops", "login", "--output"):
            assert word in out
    assert "bashcompinit" in out


def test_cp_uploads_and_downloads(api, capsys, tmp_path):
    import hashlib

    store = {}

    def put(request):
        store["data"] = request.read()
        return answer(201, {"path": "/tmp/f", "size": 3, "sha256": hashlib.sha256(store["data"]).hexdigest()})

    api.route("GET", f"/api/v1/vms/{VM_ID}/", VM)
    api.route("PUT", f"/api/v1/vms/{VM_ID}/files/", put)
    api.route(
        "GET",
        f"/api/v1/vms/{VM_ID}/files/",
        lambda r: answer(200, None, {"X-Checksum-Sha256": hashlib.sha256(b"abc").hexdigest()}).__class__(
            200, content=store["data"], headers={"X-Checksum-Sha256": hashlib.sha256(store["data"]).hexdigest()}
        ),
    )
    local = tmp_path / "f"
    local.write_bytes(b"abc")
    code, out, _ = run(capsys, "cp", str(local), f"{VM_ID}:/tmp/")
    assert code == 0 and store["data"] == b"abc" and api.calls("PUT")[0].url.params["path"] == "/tmp/f"
    code, _, _ = run(capsys, "cp", f"{VM_ID}:/tmp/f", str(tmp_path / "back"))
    assert code == 0 and (tmp_path / "back").read_bytes() == b"abc"


def test_the_quickstarts_are_short_and_valid():
    from pathlib import Path

    docs = Path(__file__).resolve().parents[2] / "docs"
    text = (docs / "sdk.md").read_text()
    block = text.split("## Quickstart", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) < 10
    compile(block, "quickstart", "exec")
    assert "Sandbox.create" in block and "exec(" in block and "download(" in block
    cli_block = (docs / "cli.md").read_text().split("## Quickstart", 1)[1].split("```", 2)[1]
    parser = cli.build_parser()
    for line in cli_block.strip().splitlines():
        words = line.split("#", 1)[0].split()
        assert words[0] == "msbx"
        parser.parse_args(words[1:])


def test_the_sdk_imports_no_django():
    import subprocess
    import sys
    from pathlib import Path

    src = Path(msbx.__file__).resolve().parents[1]
    code = "import sys, msbx, msbx.aio, msbx.cli; sys.exit(any(m.split('.')[0] == 'django' for m in sys.modules))"
    env = {"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode == 0


def test_vm_create_sends_placement_and_project_only_when_asked(api, capsys):
    api.route("POST", "/api/v1/vms/", {**VM, "operation": None})
    code, _, _ = run(capsys, "vm", "create", "-n", "box", "--no-wait")
    assert code == 0
    sent = json.loads(api.requests[-1].content)
    assert "host" not in sent and "anti_affinity" not in sent  # the server's defaults apply
    code, _, _ = run(
        capsys, "vm", "create", "-n", "box2", "--no-wait", "--host", "h2", "--anti-affinity", "--project", "team"
    )
    assert code == 0
    sent = json.loads(api.requests[-1].content)
    assert sent["host"] == "h2" and sent["anti_affinity"] is True and sent["project"] == "team"
