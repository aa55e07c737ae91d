"""The SDK against an in-process fake API (httpx.MockTransport): retries, errors, pagination,
operations, exec streaming and resume, files with sha256, the async client's same surface."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat

import httpx
import msbx
import pytest
from msbx import _http
from msbx.aio import AsyncClient
from msbx.config import config_save_profile, credentials_resolve

from tests.sdk.fake import TOKEN, URL, FakeApi, answer, error

VM_ID = "11111111-2222-3333-4444-555555555555"
VM = {"id": VM_ID, "name": "box", "state": "running", "vcpus": 1, "memory_mib": 256, "template": "linux-small"}


@pytest.fixture
def api():
    return FakeApi()


@pytest.fixture
def sleeps(monkeypatch):
    """Record (instead of doing) the SDK's sleeps."""
    slept: list[float] = []
    monkeypatch.setattr(_http.time, "sleep", slept.append)
    return slept


@pytest.fixture
def client(api, sleeps):
    with msbx.Client(URL, TOKEN, transport=api.sync_transport(), backoff=0.01) as c:
        yield c


def test_it_sends_the_bearer_token_and_reads_a_vm(api, client):
    api.route("GET", f"/api/v1/vms/{VM_ID}/", VM)
    sandbox = msbx.Sandbox.connect(VM_ID, client=client)
    assert (sandbox.id, sandbox.name, sandbox.state) == (VM_ID, "box", "running")
    assert api.requests[0].headers["User-Agent"].startswith("msbx/")


def test_it_retries_503_and_429_honouring_retry_after(api, client, sleeps):
    api.route(
        "GET",
        f"/api/v1/vms/{VM_ID}/",
        [error(503, "unavailable", **{"Retry-After": "2"}), error(429, "throttled", **{"Retry-After": "1.5"}), VM],
    )
    assert client.sandbox(VM_ID).name == "box"
    assert len(api.requests) == 3
    assert sleeps == [2.0, 1.5]


def test_it_backs_off_exponentially_without_retry_after_and_gives_up(api, client, sleeps):
    api.route("GET", "/api/v1/vms/.*", error(503, "unavailable", "hostd is down"))
    with pytest.raises(msbx.ServiceUnavailable) as caught:
        client.sandbox(VM_ID)
    assert len(api.requests) == 5  # the first try and 4 retries
    assert len(sleeps) == 4 and all(b >= a * 0.9 for a, b in zip(sleeps, sleeps[1:]))
    assert caught.value.request_id == "req123" and caught.value.code == "unavailable"


def test_it_does_not_wait_an_hour_for_retry_after(api, client, sleeps):
    api.route("POST", "/api/v1/vms/", error(429, "throttled", "slow down", **{"Retry-After": "3600"}))
    with pytest.raises(msbx.RateLimited) as caught:
        client.create_sandbox(template="linux-small", wait=False)
    assert caught.value.retry_after == 3600 and sleeps == []


def test_it_retries_a_refused_connection_but_not_a_post_that_timed_out(api, client, sleeps):
    api.route("GET", "/api/v1/vms/.*", [httpx.ConnectError("refused"), VM])
    assert client.sandbox(VM_ID).name == "box"
    api.route("POST", "/api/v1/vms/.*/start/", httpx.ReadTimeout("slow"))
    with pytest.raises(msbx.Timeout):
        client.sandbox(VM_ID).start()
    assert len(api.calls("POST", "/start/")) == 1


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "invalid", msbx.ValidationError),
        (401, "authentication_failed", msbx.AuthenticationError),
        (403, "permission_denied", msbx.PermissionDenied),
        (403, "quota_exceeded", msbx.QuotaExceeded),
        (404, "not_found", msbx.NotFound),
        (409, "vm_not_running", msbx.Conflict),
        (413, "too_large", msbx.TooLarge),
        (500, "error", msbx.ServerError),
    ],
)
def test_it_maps_the_api_error_shape_to_exceptions(api, client, status, code, cls):
    api.route("GET", "/api/v1/vms/.*", error(status, code, "because", {"name": ["taken"]}))
    with pytest.raises(cls) as caught:
        client.sandbox(VM_ID)
    assert caught.value.status == status and caught.value.code == code
    assert caught.value.message == "because" and caught.value.request_id == "req123"
    assert isinstance(caught.value, msbx.ApiError) and isinstance(caught.value, msbx.SandboxError)


def test_validation_errors_carry_field_details(api, client):
    api.route("POST", "/api/v1/vms/", error(400, "invalid", "Invalid input.", {"memory_mib": ["too small"]}))
    with pytest.raises(msbx.ValidationError) as caught:
        client.create_sandbox(template="linux-small", memory_mib=1, wait=False)
    assert caught.value.fields == {"memory_mib": ["too small"]}
    assert "memory_mib: too small" in str(caught.value)


def test_a_field_message_the_answer_already_says_is_not_repeated():
    same = msbx.ValidationError("pty rows must be 1-1000.", details={"pty.rows": ["pty rows must be 1-1000."]})
    assert str(same).startswith("pty rows must be 1-1000.") and "pty.rows" not in str(same)
    more = msbx.ValidationError("pty rows must be 1-1000.", details={"pty.rows": ["x"], "cwd": ["bad"]})
    assert str(more) == "pty rows must be 1-1000. pty.rows: x; cwd: bad"


def vm_list_answer(rows):
    """The VM list as the server answers it: ``?state=`` and ``?name=`` (substring,
    case-insensitive) filters, then a page by ``limit``/``offset``."""

    def page(request):
        params = request.url.params
        state, name = params.get("state"), params.get("name", "").lower()
        found = [r for r in rows if (not state or r["state"] == state) and name in r["name"].lower()]
        offset, limit = int(params.get("offset", 0)), int(params.get("limit", 50))
        more = offset + limit < len(found)
        return {"count": len(found), "next": "x" if more else None, "results": found[offset : offset + limit]}

    return page


def test_it_iterates_over_pages(api, client):
    rows = [{**VM, "id": f"id-{i}", "name": f"vm-{i}", "state": "running" if i % 2 else "stopped"} for i in range(7)]
    api.route("GET", "/api/v1/vms/", vm_list_answer(rows))
    assert [sb.name for sb in client.sandboxes(page_size=3)] == [f"vm-{i}" for i in range(7)]
    assert len(api.calls("GET", "/api/v1/vms/")) == 3
    assert [sb.name for sb in client.sandboxes(state="running", page_size=3)] == ["vm-1", "vm-3", "vm-5"]
    assert api.requests[-1].url.params["state"] == "running"  # the server filters


NAMED = [
    {**VM, "id": "aaaaaaaa-0000-0000-0000-000000000001", "name": "box-2"},
    {**VM, "id": "aaaaaaaa-0000-0000-0000-000000000002", "name": "web"},
    VM,  # "box"
]


def test_it_finds_a_vm_by_exact_name_with_the_list_filter_and_never_asks_the_detail_for_it(api, client):
    api.route("GET", "/api/v1/vms/", vm_list_answer(NAMED))
    assert client.sandbox("box").id == VM_ID
    assert [r.url.path for r in api.requests] == ["/api/v1/vms/"]
    assert api.requests[0].url.params["name"] == "box"
    assert msbx.Sandbox.connect("web", client=client).name == "web"
    with pytest.raises(msbx.NotFound, match="no VM 'bo'"):
        client.sandbox("bo")  # a substring of two names is neither of them
    assert not api.calls("GET", "/api/v1/vms/bo")


def test_it_refuses_a_name_several_visible_vms_share(api, client):
    api.route("GET", "/api/v1/vms/", vm_list_answer([VM, {**VM, "id": "aaaaaaaa-0000-0000-0000-000000000009"}]))
    with pytest.raises(msbx.SandboxError, match="2 VMs are named 'box': use the id"):
        client.sandbox("box")


def test_it_reads_a_vm_id_straight_from_its_detail(api, client):
    api.route("GET", f"/api/v1/vms/{VM_ID}/", VM)
    assert client.sandbox(VM_ID).name == "box"
    assert [r.url.path for r in api.requests] == [f"/api/v1/vms/{VM_ID}/"]


def test_it_refuses_fields_the_endpoint_table_does_not_declare():
    with pytest.raises(ValueError, match="not in the endpoint table"):
        _http.prepare("vm_create", None, None, {"name": "x", "colour": "red"})


def _operation_sequence(*statuses, action="stop", error_text=""):
    return [
        {"id": "op-1", "action": action, "status": s, "progress": p, "log": "", "error": error_text}
        for s, p in statuses
    ]


def test_an_operation_waits_with_progress_callbacks_through_unknown_states(api, client):
    api.route("POST", f"/api/v1/vms/{VM_ID}/stop/", {"id": "op-1", "action": "stop", "status": "queued"})
    api.route(
        "GET",
        "/api/v1/operations/op-1/",
        _operation_sequence(("queued", 0), ("stopping", 10), ("stopping", 10), ("running", 60), ("succeeded", 100)),
    )
    api.route("GET", f"/api/v1/vms/{VM_ID}/", VM)
    seen = []
    op = client.sandbox(VM_ID).stop().wait(on_progress=lambda o: seen.append((o["status"], o["progress"])))
    assert op.status == "succeeded" and op.done
    assert seen == [("queued", 0), ("stopping", 10), ("running", 60), ("succeeded", 100)]


def test_a_move_names_the_host_and_waits_through_its_steps_on_both_hosts(api, client):
    api.route("POST", f"/api/v1/vms/{VM_ID}/move/", {"id": "op-1", "action": "move", "status": "pending"})
    api.route(
        "GET",
        "/api/v1/operations/op-1/",
        _operation_sequence(("running", 40), ("pending", 70), ("running", 80), ("succeeded", 100), action="move"),
    )
    api.route("GET", f"/api/v1/vms/{VM_ID}/", VM)
    op = client.sandbox(VM_ID).move("h2").wait()
    assert op.status == "succeeded"
    move = next(r for r in api.requests if r.method == "POST")
    assert json.loads(move.content) == {"host": "h2"}


def test_a_failed_operation_raises(api, client):
    api.route("GET", "/api/v1/operations/op-1/", _operation_sequence(("failed", 50), error_text="disk full"))
    with pytest.raises(msbx.OperationFailed, match="disk full") as caught:
        client.operation("op-1").wait()
    assert caught.value.operation["status"] == "failed"


def test_an_operation_wait_times_out(api, client):
    api.route("GET", "/api/v1/operations/op-1/", _operation_sequence(("running", 5)))
    with pytest.raises(msbx.Timeout):
        client.operation("op-1").wait(timeout=0)


def test_create_waits_for_the_operation_and_running_and_deletes_on_exit(api, client):
    created = {**VM, "state": "creating", "operation": "op-1"}
    api.route("POST", "/api/v1/vms/", answer(202, created))
    api.route("GET", "/api/v1/operations/op-1/", _operation_sequence(("succeeded", 100), action="create"))
    api.route("GET", f"/api/v1/vms/{VM_ID}/", [{**VM, "state": "starting"}, {**VM, "state": "resizing"}, VM])
    api.route("DELETE", f"/api/v1/vms/{VM_ID}/", answer(202, {"id": "op-2", "action": "delete", "status": "queued"}))
    api.route("GET", "/api/v1/operations/op-2/", _operation_sequence(("succeeded", 100), action="delete"))
    with msbx.Sandbox.create(template="linux-small", vcpus=1, memory_mib=256, client=client) as sb:
        assert sb.state == "running"
    body = api.body(api.calls("POST", "/api/v1/vms/")[0])
    assert body["template"] == "linux-small" and body["vcpus"] == 1 and body["name"].startswith("sb-")
    assert len(api.calls("DELETE")) == 1


def test_a_vm_that_fails_to_boot_raises(api, client):
    api.route("POST", "/api/v1/vms/", answer(202, {**VM, "state": "creating", "operation": None}))
    api.route("GET", f"/api/v1/vms/{VM_ID}/", {**VM, "state": "error", "last_error": "kernel panic"})
    with pytest.raises(msbx.OperationFailed, match="kernel panic"):
        client.create_sandbox(template="broken")


def _exec_routes(api, pages, result=None):
    api.route("POST", f"/api/v1/vms/{VM_ID}/exec/", answer(202, {"exec_id": "e1", "running": True}))
    api.route("GET", f"/api/v1/vms/{VM_ID}/", VM)
    api.route("GET", f"/api/v1/vms/{VM_ID}/execs/e1/", pages)


def _page(offset, chunks, running=True, result=None):
    out, at = [], offset
    for stream, data in chunks:
        out.append({"stream": stream, "offset": at, "length": len(data), "data": base64.b64encode(data).decode()})
        at += len(data)
    return {
        "offset": offset,
        "next_offset": at,
        "end_offset": at,
        "gap": False,
        "running": running,
        "result": result,
        "chunks": out,
    }


def test_exec_streams_output_to_callbacks_and_returns_the_exit_code(api, client):
    euro = "€".encode()
    _exec_routes(
        api,
        [
            _page(0, [("stdout", b"hello " + euro[:1])]),
            _page(7, [("stdout", euro[1:] + b"\n"), ("stderr", b"warn\n")]),
            _page(16, [], running=False, result={"exit_code": 3, "signal": None, "timed_out": False}),
        ],
    )
    out, err = [], []
    result = client.sandbox(VM_ID).exec(["sh", "-c", "x"], on_stdout=out.append, on_stderr=err.append)
    assert result.exit_code == 3 and not result.ok
    assert "".join(out) == "hello €\n" and result.stdout == "hello €\n" and result.stderr == "warn\n"
    assert api.body(api.calls("POST", "/exec/")[0])["wait"] is False
    with pytest.raises(msbx.CommandFailed):
        client.sandbox(VM_ID).exec("false", on_stdout=out.append, check=True)


def test_exec_without_callbacks_waits_on_the_server(api, client):
    api.route("GET", f"/api/v1/vms/{VM_ID}/", VM)
    api.route(
        "POST",
        f"/api/v1/vms/{VM_ID}/exec/",
        {"exec_id": "e2", "running": False, "exit_code": None, "signal": "SIGKILL", "stdout": "a", "stderr": ""},
    )
    result = client.sandbox(VM_ID).exec("sleep 100", timeout=5, env={"A": "1"}, cwd="/tmp", stdin="in")
    assert result.signal == "SIGKILL" and result.exit_code is None and result.stdout == "a"
    body = api.body(api.calls("POST", "/exec/")[0])
    assert body == {"command": "sleep 100", "env": {"A": "1"}, "cwd": "/tmp", "timeout": 5, "stdin": "in", "wait": True}


def test_a_background_process_resumes_its_output_after_a_dropped_connection(api, client):
    _exec_routes(
        api,
        [
            _page(0, [("stdout", b"one\n")]),
            httpx.RemoteProtocolError("connection dropped"),
            httpx.ConnectError("web restarting"),
            _page(4, [("stdout", b"two\n")], running=False, result={"exit_code": 0}),
        ],
    )
    process = client.sandbox(VM_ID).exec("seq", background=True)
    assert isinstance(process, msbx.Process)
    chunks = list(process.output())
    assert b"".join(c.data for c in chunks) == b"one\ntwo\n"
    offsets = [int(r.url.params["offset"]) for r in api.calls("GET", "/execs/e1/")]
    assert offsets[0] == 0 and offsets[-1] == 4  # continued from where it stopped
    assert process.result.exit_code == 0 and process.offset == 8


def test_a_process_is_killed_and_fed_stdin(api, client):
    _exec_routes(api, [_page(0, [])])
    api.route("POST", f"/api/v1/vms/{VM_ID}/execs/e1/signal/", {"ok": True})
    api.route("POST", f"/api/v1/vms/{VM_ID}/execs/e1/stdin/", {"ok": True})
    process = client.sandbox(VM_ID).exec("cat", background=True)
    process.write(b"data")
    process.close_stdin()
    process.kill()
    assert [api.body(r) for r in api.calls("POST", "/stdin/")] == [{"data": "data"}, {"data": "", "eof": True}]
    assert api.body(api.calls("POST", "/signal/")[0]) == {"signal": "KILL"}
    assert api.body(api.calls("POST", "/exec/")[0])["stdin_open"] is True


def test_files_are_streamed_and_checked_with_sha256(api, client, tmp_path):
    payload = os.urandom(600 << 10)
    stored = {}

    def put(request):
        stored["data"] = request.read()
        stored["length"] = request.headers.get("Content-Length")
        digest = hashlib.sha256(stored["data"]).hexdigest()
        return answer(201, {"path": request.url.params["path"], "size": len(stored["data"]), "sha256": digest})

    def get(request):
        return httpx.Response(
            200, content=stored["data"], headers={"X-Checksum-Sha256": hashlib.sha256(stored["data"]).hexdigest()}
        )

    api.route("GET", f"/api/v1/vms/{VM_ID}/", VM)
    api.route("PUT", f"/api/v1/vms/{VM_ID}/files/", put)
    api.route("GET", f"/api/v1/vms/{VM_ID}/files/", get)
    sandbox = client.sandbox(VM_ID)
    local = tmp_path / "in.bin"
    local.write_bytes(payload)
    progress = []
    result = sandbox.files.write("/tmp/x", local, mode=0o600, on_progress=lambda done, total: progress.append(done))
    assert result.sha256 == hashlib.sha256(payload).hexdigest() and stored["data"] == payload
    assert stored["length"] == str(len(payload)) and progress[-1] == len(payload) and len(progress) == 3
    assert api.calls("PUT")[0].url.params["mode"] == "600"
    out = tmp_path / "out.bin"
    assert sandbox.files.download("/tmp/x", out).sha256 == result.sha256
    assert out.read_bytes() == payload
    assert sandbox.files.read("/tmp/x") == payload


def test_a_download_whose_checksum_differs_raises_and_leaves_no_file(api, client, tmp_path):
    api.route("GET", f"/api/v1/vms/{VM_ID}/", VM)
    api.route(
        "GET",
        f"/api/v1/vms/{VM_ID}/files/",
        httpx.Response(200, content=b"abc", headers={"X-Checksum-Sha256": "0" * 64}),
    )
    with pytest.raises(msbx.IntegrityError):
        client.sandbox(VM_ID).files.download("/tmp/x", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_an_upload_the_guest_hashed_differently_raises(api, client):
    api.route("GET", f"/api/v1/vms/{VM_ID}/", VM)
    api.route("PUT", f"/api/v1/vms/{VM_ID}/files/", answer(201, {"path": "/x", "size": 3, "sha256": "f" * 64}))
    with pytest.raises(msbx.IntegrityError):
        client.sandbox(VM_ID).files.write("/x", b"abc")


def test_snapshot_clone_and_port_forwards(api, client):
    api.route("GET", f"/api/v1/vms/{VM_ID}/", VM)
    api.route("POST", f"/api/v1/vms/{VM_ID}/snapshots/", answer(202, {"id": "s1", "name": "n", "operation": "op-1"}))
    api.route("GET", "/api/v1/operations/op-.*/", _operation_sequence(("succeeded", 100)))
    api.route("GET", "/api/v1/snapshots/s1/", {"id": "s1", "name": "n", "state": "ready"})
    clone = {**VM, "id": "c1", "name": "web-1", "operation": "op-2"}
    api.route("POST", "/api/v1/snapshots/s1/clone/", answer(202, {"vms": [clone]}))
    api.route("GET", "/api/v1/vms/c1/", {**clone, "state": "running"})
    api.route(
        "GET", f"/api/v1/vms/{VM_ID}/port-forwards/", answer(200, [{"id": 1, "guest_port": 80, "host_port": 20080}])
    )
    sandbox = client.sandbox(VM_ID)
    snap = sandbox.snapshot("n")
    assert snap.state == "ready"
    clones = snap.clone(1, name_prefix="web")
    assert [c.name for c in clones] == ["web-1"] and clones[0].state == "running"
    assert api.body(api.calls("POST", "/clone/")[0]) == {"count": 1, "name_prefix": "web"}
    assert sandbox.port_forwards.list()[0]["host_port"] == 20080


def test_resize_of_a_stopped_vm_is_done_at_once(api, client):
    api.route("GET", f"/api/v1/vms/{VM_ID}/", {**VM, "state": "stopped"})
    api.route("PATCH", f"/api/v1/vms/{VM_ID}/", {**VM, "state": "stopped", "vcpus": 2})
    sandbox = client.sandbox(VM_ID)
    op = sandbox.resize(vcpus=2)
    assert op.done and op.wait() is op and sandbox.data["vcpus"] == 2


def test_retry_after_parses_seconds_and_dates():
    assert _http.parse_retry_after("3") == 3.0
    assert _http.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert _http.parse_retry_after("soon") is None
    assert _http.RetryPolicy(retries=1).delay(1, 2.0) is None


def test_credentials_come_from_arguments_then_environment_then_profiles(tmp_path, monkeypatch):
    monkeypatch.setenv("MSBX_CONFIG", str(tmp_path / "cfg" / "config.json"))
    monkeypatch.delenv("MSBX_URL", raising=False)
    monkeypatch.delenv("MSBX_TOKEN", raising=False)
    monkeypatch.delenv("MSBX_PROFILE", raising=False)
    with pytest.raises(msbx.ConfigError):
        credentials_resolve()
    path = config_save_profile("prod", url="https://prod/", token="t-prod")
    config_save_profile("lab", url="http://lab", token="t-lab", make_default=False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["default"] == "prod"
    assert credentials_resolve() == msbx.Credentials("https://prod", "t-prod", "prod")
    assert credentials_resolve(profile="lab").token == "t-lab"
    monkeypatch.setenv("MSBX_TOKEN", "t-env")
    assert credentials_resolve().token == "t-env"
    assert credentials_resolve(token="t-arg").token == "t-arg"
    monkeypatch.setenv("MSBX_URL", "http://env")
    assert credentials_resolve() == msbx.Credentials("http://env", "t-env")
    with pytest.raises(msbx.ConfigError, match="nope"):
        credentials_resolve(profile="nope")


# ----- the async client: same surface ------------------------------------------------------------
@pytest.fixture
async def aclient(api):
    async with AsyncClient(URL, TOKEN, transport=httpx.MockTransport(api), backoff=0.001) as c:
        yield c


async def test_the_async_client_retries_and_pages(api, aclient):
    api.route("GET", f"/api/v1/vms/{VM_ID}/", [error(503, "unavailable", **{"Retry-After": "0"}), VM])
    assert (await aclient.sandbox(VM_ID)).name == "box"
    api.route("GET", "/api/v1/vms/", [{"count": 2, "next": "x", "results": [VM]}, {"count": 2, "results": [VM]}])
    assert len([sb async for sb in aclient.sandboxes()]) == 2


async def test_the_async_client_finds_vms_by_name_and_id_as_the_sync_one_does(api, aclient):
    api.route("GET", "/api/v1/vms/", vm_list_answer(NAMED))
    api.route("GET", f"/api/v1/vms/{VM_ID}/", VM)
    assert (await aclient.sandbox("box")).id == VM_ID
    assert (await aclient.sandbox(VM_ID)).name == "box"
    assert [r.url.path for r in api.requests] == ["/api/v1/vms/", f"/api/v1/vms/{VM_ID}/"]
    assert api.requests[0].url.params["name"] == "box"
    with pytest.raises(msbx.NotFound):
        await aclient.sandbox("bo")
    assert [sb.name async for sb in aclient.sandboxes(state="running", name="WEB")] == ["web"]


async def test_the_async_client_streams_exec_output_and_maps_errors(api, aclient):
    _exec_routes(
        api,
        [
            _page(0, [("stdout", b"hi\n")]),
            httpx.ConnectError("blip"),
            _page(3, [("stderr", b"oops\n")], running=False, result={"exit_code": 1}),
        ],
    )
    sandbox = await msbx.aio.AsyncSandbox.connect(VM_ID, client=aclient)
    seen = []

    async def on_stdout(text):
        seen.append(text)

    result = await sandbox.exec("x", on_stdout=on_stdout)
    assert (result.exit_code, result.stdout, result.stderr, seen) == (1, "hi\n", "oops\n", ["hi\n"])
    process = await sandbox.exec("x", background=True)
    assert [c.data async for c in process.output(offset=0)][-1] == b"oops\n"
    api.route("GET", f"/api/v1/vms/{VM_ID}/files/stat/", error(404, "not_found"))
    assert await sandbox.files.exists("/nope") is False


async def test_the_async_client_uploads_with_sha256(api, aclient):
    def put(request):
        data = request.read()
        return answer(201, {"path": "/x", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})

    api.route("GET", f"/api/v1/vms/{VM_ID}/", VM)
    api.route("PUT", f"/api/v1/vms/{VM_ID}/files/", put)
    sandbox = await aclient.sandbox(VM_ID)

    async def chunks():
        yield b"a" * 1000
        yield b"b" * 1000

    result = await sandbox.files.write("/x", chunks())
    assert result.size == 2000 and result.sha256 == hashlib.sha256(b"a" * 1000 + b"b" * 1000).hexdigest()


async def test_the_async_client_reads_a_slow_pipe_without_stalling_the_event_loop(api, aclient):
    import asyncio
    import threading

    def put(request):
        data = request.read()
        return answer(201, {"path": "/x", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})

    api.route("GET", f"/api/v1/vms/{VM_ID}/", VM)
    api.route("PUT", f"/api/v1/vms/{VM_ID}/files/", put)
    sandbox = await aclient.sandbox(VM_ID)
    read_end, write_end = os.pipe()
    writer_may_write = threading.Event()

    def slow_writer():  # writes only once the event loop ran meanwhile; else sends nothing
        if writer_may_write.wait(5):
            os.write(write_end, b"late data")
        os.close(write_end)

    threading.Thread(target=slow_writer, daemon=True).start()
    ticks = 0

    async def ticker():
        nonlocal ticks
        for _ in range(20):  # the pipe stays empty until the loop has run 20 times
            await asyncio.sleep(0.01)
            ticks += 1
        writer_may_write.set()

    with os.fdopen(read_end, "rb", buffering=0) as source:
        result, _ = await asyncio.wait_for(asyncio.gather(sandbox.files.write("/x", source), ticker()), 30)
    assert ticks == 20 and result.size == len(b"late data")


def test_sync_and_async_clients_have_the_same_surface():
    from msbx import aio, client

    pairs = [
        (client.Client, aio.AsyncClient),
        (client.Sandbox, aio.AsyncSandbox),
        (client.Operation, aio.AsyncOperation),
        (client.Process, aio.AsyncProcess),
        (client.Files, aio.AsyncFiles),
        (client.Snapshot, aio.AsyncSnapshot),
        (client.PortForwards, aio.AsyncPortForwards),
        (client.Console, aio.AsyncConsole),
        (client.PtySession, aio.AsyncPtySession),
    ]
    for sync_cls, async_cls in pairs:
        public = {n for n in dir(sync_cls) if not n.startswith("_")}
        assert public <= set(dir(async_cls)), (sync_cls, public - set(dir(async_cls)))


class _Pipe:
    """A readable that cannot seek (like stdin)."""

    def __init__(self, data: bytes) -> None:
        self.stream = __import__("io").BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self.stream.read(n)

    def tell(self) -> int:
        raise OSError("Illegal seek")


def test_uploads_are_replayed_after_a_503_unless_they_come_from_a_pipe(api, client):
    received = []

    def put(request):
        data = request.read()
        received.append(data)
        if len(received) == 1:
            return error(503, "unavailable")
        return answer(201, {"path": "/x", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})

    api.route("GET", f"/api/v1/vms/{VM_ID}/", VM)
    api.route("PUT", f"/api/v1/vms/{VM_ID}/files/", put)
    sandbox = client.sandbox(VM_ID)
    payload = os.urandom(700 << 10)
    assert sandbox.files.write("/x", payload).size == len(payload)
    assert received == [payload, payload]
    received.clear()
    with pytest.raises(msbx.ServiceUnavailable):
        sandbox.files.write("/x", _Pipe(payload))
    assert received == [payload]  # read once, chunked, not replayed
    assert "Content-Length" not in api.calls("PUT")[-1].headers
