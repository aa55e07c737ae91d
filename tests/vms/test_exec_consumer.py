"""Exec websocket (vms/exec_consumers.py) against a real hostd and a stand-in VMM running the
real guest agent code (tests/vms/conftest.py): stdin, signal and resize go through the exec
services, so they are checked and audited exactly like their REST twins."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.utils import timezone
from guardian.shortcuts import assign_perm, remove_perm

from accounts import services
from accounts.models import AuditEvent
from sandbox_site.asgi import application
from vms import exec_services

pytestmark = pytest.mark.django_db(transaction=True)

# Compared between a REST and a websocket signal: everything but ids, times and the exec.
AUDITED = ("actor_id", "actor_username", "token_id", "source_ip", "action", "object_type", "object_id", "result")


async def connect(vm, exec_id, user):
    comm = WebsocketCommunicator(
        application,
        f"/ws/vms/{vm.pk}/execs/{exec_id}/",
        headers=[(b"origin", b"http://localhost"), (b"host", b"localhost")],
    )
    comm.scope["user"] = user
    comm.scope["client"] = ("127.0.0.1", 40000)  # what the test client's REST requests come from
    connected, code = await comm.connect(timeout=5)
    return comm, connected, code


async def control(comm, kind, *, timeout=10):
    """The next JSON control message of ``kind`` (output frames and others are skipped)."""
    while True:
        frame = await comm.receive_output(timeout)
        if frame["type"] == "websocket.close":
            raise AssertionError(f"socket closed ({frame.get('code')}) before {kind!r}")
        if frame.get("text") is not None:
            message = json.loads(frame["text"])
            if message["type"] == kind:
                return message


@database_sync_to_async
def start(vm, actor, command, **kwargs):
    return exec_services.vm_exec_start(vm=vm, actor=actor, command=command, wait=False, **kwargs)["exec_id"]


@database_sync_to_async
def rest_signal(api, vm, actor, exec_id, signal):
    api.as_user(actor)
    return api.post(f"/api/v1/vms/{vm.pk}/execs/{exec_id}/signal/", {"signal": signal}, format="json")


@database_sync_to_async
def signal_rows(vm):
    return list(AuditEvent.objects.filter(object_id=str(vm.pk), action="vm.exec_signal").order_by("id"))


async def test_a_websocket_signal_is_audited_like_a_rest_one(api, owner, live_vm):
    vm, _ = live_vm
    by_rest = await start(vm, owner, "sleep 60")
    by_socket = await start(vm, owner, "sleep 60")
    assert (await rest_signal(api, vm, owner, by_rest, "TERM")).status_code == 200

    comm, connected, _ = await connect(vm, by_socket, owner)
    assert connected
    await control(comm, "attached")
    await comm.send_json_to({"type": "signal", "signal": "TERM"})
    assert (await control(comm, "exit"))["result"]["signal"] == "SIGTERM"
    await comm.disconnect()

    rest, socket = await signal_rows(vm)
    assert [getattr(rest, name) for name in AUDITED] == [getattr(socket, name) for name in AUDITED]
    assert (rest.result, rest.source_ip) == ("ok", "127.0.0.1")
    assert (rest.after, socket.after) == (
        {"exec_id": by_rest, "signal": "TERM"},
        {"exec_id": by_socket, "signal": "TERM"},
    )
    assert rest.request_id and socket.request_id and rest.request_id != socket.request_id


async def test_stdin_and_eof_reach_the_process(owner, live_vm):
    vm, _ = live_vm
    exec_id = await start(vm, owner, ["cat"], stdin_open=True)
    comm, connected, _ = await connect(vm, exec_id, owner)
    assert connected
    await control(comm, "attached")
    await comm.send_to(bytes_data=b"typed\n")
    assert await comm.receive_from(10) == b"\x01typed\n"
    await comm.send_json_to({"type": "eof"})
    assert (await control(comm, "exit"))["result"]["exit_code"] == 0
    await comm.disconnect()


async def test_a_user_without_the_exec_right_is_refused(grantee, live_vm):
    vm, _ = live_vm
    await database_sync_to_async(assign_perm)("vms.view_vm", grantee, vm)
    comm, connected, code = await connect(vm, "any", grantee)
    assert (connected, code) == (False, 4403)


async def test_a_signal_after_the_exec_right_was_revoked_is_refused_and_audited(owner, grantee, live_vm):
    vm, _ = live_vm
    for perm in ("view_vm", "exec_vm"):
        await database_sync_to_async(assign_perm)(f"vms.{perm}", grantee, vm)
    exec_id = await start(vm, owner, "sleep 60")
    comm, connected, _ = await connect(vm, exec_id, grantee)
    assert connected
    await control(comm, "attached")
    await database_sync_to_async(remove_perm)("vms.exec_vm", grantee, vm)

    await comm.send_json_to({"type": "signal", "signal": "KILL"})
    assert (await control(comm, "error"))["code"] == "permission_denied"
    assert (await comm.receive_output(5)) == {"type": "websocket.close", "code": 4403}
    [denied] = await signal_rows(vm)
    assert (denied.actor_id, denied.result) == (grantee.pk, "denied")
    running = await database_sync_to_async(exec_services.vm_exec_list)(vm=vm, actor=owner)
    assert [e["running"] for e in running if e["exec_id"] == exec_id] == [True]


async def _output_until_quiet(comm, quiet: float = 1.5) -> int:
    """Output bytes received until nothing arrives for ``quiet`` seconds."""
    got = 0
    while True:
        if await comm.receive_nothing(quiet):
            return got
        frame = await comm.receive_output(5)
        if frame.get("bytes") is not None:
            got += len(frame["bytes"]) - 1


async def test_output_stops_at_the_window_until_acknowledged_and_overacking_gains_nothing(owner, live_vm, settings):
    settings.SANDBOX_EXEC_WINDOW_BYTES = 64 << 10
    vm, _ = live_vm
    exec_id = await start(vm, owner, "head -c 1000000 /dev/zero", buffer_bytes=4 << 20)
    comm, connected, _ = await connect(vm, exec_id, owner)
    assert connected
    attached = await control(comm, "attached")
    assert attached["window"] == 64 << 10
    assert await _output_until_quiet(comm) == 64 << 10  # not a byte more without an ack
    # Acknowledging far more than was sent counts as acknowledging what was sent.
    await comm.send_json_to({"type": "ack", "offset": 10**12})
    assert await _output_until_quiet(comm) == 64 << 10
    await comm.send_json_to({"type": "ack", "offset": 128 << 10})
    assert await _output_until_quiet(comm) == 64 << 10
    await comm.disconnect()


# ----- /ws/vms/{id}/exec/: the socket starts the command -----------------------------------


async def connect_start(vm, user, *, headers=()):
    comm = WebsocketCommunicator(
        application,
        f"/ws/vms/{vm.pk}/exec/",
        headers=[(b"origin", b"http://localhost"), (b"host", b"localhost"), *headers],
    )
    comm.scope["user"] = user
    comm.scope["client"] = ("127.0.0.1", 40000)
    connected, code = await comm.connect(timeout=5)
    return comm, connected, code


@database_sync_to_async
def exec_rows(vm):
    return list(AuditEvent.objects.filter(object_id=str(vm.pk), action="vm.exec").order_by("id"))


async def test_a_socket_starts_its_command_streams_it_and_is_audited_like_a_rest_start(api, owner, live_vm):
    vm, _ = live_vm

    @database_sync_to_async
    def rest_start():
        api.as_user(owner)
        body = {"command": ["sh", "-c", "cat; echo done"], "stdin": "hi\n", "wait": False}
        return api.post(f"/api/v1/vms/{vm.pk}/exec/", body, format="json").json()["exec_id"]

    by_rest = await rest_start()
    comm, connected, _ = await connect_start(vm, owner)
    assert connected
    await comm.send_json_to({"type": "start", "command": ["sh", "-c", "cat; echo done"], "stdin": "hi\n"})
    started = await control(comm, "started")
    attached = await control(comm, "attached")
    assert attached["exec_id"] == started["exec_id"] and attached["offset"] == 0
    output = b""
    while True:
        frame = await comm.receive_output(10)
        if frame.get("bytes") is not None:
            output += frame["bytes"][1:]
        elif json.loads(frame["text"])["type"] == "exit":
            assert json.loads(frame["text"])["result"]["exit_code"] == 0
            break
    assert output == b"hi\ndone\n"
    assert (await comm.receive_output(5)) == {"type": "websocket.close", "code": 1000}

    rest, socket = await exec_rows(vm)
    assert [getattr(rest, name) for name in AUDITED] == [getattr(socket, name) for name in AUDITED]
    assert {**rest.after, "exec_id": None} == {**socket.after, "exec_id": None}
    assert (rest.after["exec_id"], socket.after["exec_id"]) == (by_rest, started["exec_id"])
    assert socket.after["wait"] is False and socket.after["stdin_bytes"] == 3


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"type": "stdin", "data": "x"}, "bad_request"),  # anything but a start first
        ({"type": "start"}, "bad_request"),  # no command
        ({"type": "start", "command": ["true"], "timeout": -1}, "bad_request"),
        ({"type": "start", "command": ["true"], "pty": {"rows": 0, "cols": 0}}, "invalid"),  # the service's check
    ],
)
async def test_a_bad_start_frame_is_refused_with_a_reason_and_starts_nothing(owner, live_vm, frame, code):
    vm, _ = live_vm
    comm, connected, _ = await connect_start(vm, owner)
    assert connected
    await comm.send_json_to(frame)
    error = await control(comm, "error")
    assert error["code"] == code
    closed = await comm.receive_output(5)
    assert closed["type"] == "websocket.close" and 4400 <= closed["code"] < 4500
    await comm.disconnect()  # the client goes: the consumer cleans up
    assert [row for row in await exec_rows(vm) if row.result == "ok"] == []


async def test_a_binary_first_frame_is_refused(owner, live_vm):
    vm, _ = live_vm
    comm, connected, _ = await connect_start(vm, owner)
    assert connected
    await comm.send_to(bytes_data=b"true\n")
    assert (await control(comm, "error"))["code"] == "bad_request"
    assert (await comm.receive_output(5)) == {"type": "websocket.close", "code": 4400}
    await comm.disconnect()  # the client goes: the consumer cleans up


async def test_a_user_without_the_exec_right_cannot_start_over_a_socket(grantee, live_vm):
    vm, _ = live_vm
    await database_sync_to_async(assign_perm)("vms.view_vm", grantee, vm)
    comm, connected, code = await connect_start(vm, grantee)
    assert (connected, code) == (False, 4403)


async def test_socket_starts_count_against_the_exec_budget_of_the_rest_api(api, owner, live_vm, settings):
    settings.SANDBOX_RATE_LIMITS = {"exec": "2/min", "user": "100/min"}
    await database_sync_to_async(cache.clear)()  # budgets charged by earlier runs
    vm, _ = live_vm
    comm, connected, _ = await connect_start(vm, owner)
    assert connected
    await comm.send_json_to({"type": "start", "command": ["true"]})
    await control(comm, "exit")
    await comm.disconnect()

    @database_sync_to_async
    def rest_exec():
        api.as_user(owner)
        return api.post(f"/api/v1/vms/{vm.pk}/exec/", {"command": ["true"]}, format="json").status_code

    assert await rest_exec() == 200  # the budget's second slot
    comm, connected, _ = await connect_start(vm, owner)
    assert connected
    await comm.send_json_to({"type": "start", "command": ["true"]})
    refused = await control(comm, "error")
    assert refused["code"] == "throttled" and refused["details"]["retry_after"] >= 1
    assert (await comm.receive_output(5)) == {"type": "websocket.close", "code": 4429}
    await comm.disconnect()  # the client goes: the consumer cleans up


async def test_a_socket_that_sends_no_start_is_closed(owner, live_vm, monkeypatch):
    from vms import exec_consumers

    monkeypatch.setattr(exec_consumers, "START_WAIT_SECONDS", 0.5)
    vm, _ = live_vm
    comm, connected, _ = await connect_start(vm, owner)
    assert connected
    assert (await control(comm, "error"))["code"] == "timeout"
    assert (await comm.receive_output(5)) == {"type": "websocket.close", "code": 4408}
    await comm.disconnect()  # the client goes: the consumer cleans up


# ----- a start frame is authenticated again, as a REST request is -------------------------


async def leave(comm):
    """The client goes (unless the communicator already stopped the consumer)."""
    if not comm.future.done():
        await comm.disconnect()


async def open_with_token(vm, secret):
    comm = WebsocketCommunicator(
        application,
        f"/ws/vms/{vm.pk}/exec/",
        headers=[
            (b"origin", b"http://localhost"),
            (b"host", b"localhost"),
            (b"authorization", f"Bearer {secret}".encode()),
        ],
    )
    comm.scope["client"] = ("127.0.0.1", 40000)
    connected, code = await comm.connect(timeout=5)
    assert connected, code
    return comm


async def frames_until_close(comm, timeout=5):
    out = []
    while True:
        try:
            f = await comm.receive_output(timeout)
        except TimeoutError:
            return out
        out.append(json.loads(f["text"]) if f.get("text") else f)


@database_sync_to_async
def ok_exec_rows(vm):
    return list(AuditEvent.objects.filter(object_id=str(vm.pk), action="vm.exec", result="ok"))


async def assert_refused(comm, code="permission_denied", close=4403) -> list:
    """The socket answered with one ``error`` of ``code`` and closed with ``close``; nothing
    was started. The frames, for more checks."""
    frames = await frames_until_close(comm)
    assert not any(isinstance(f, dict) and f.get("type") == "started" for f in frames), frames
    assert [f["code"] for f in frames if isinstance(f, dict) and f.get("type") == "error"] == [code], frames
    assert {"type": "websocket.close", "code": close} in frames, frames
    return frames


async def assert_start_refused(comm, vm, code="permission_denied", close=4403):
    """The start frame was answered with an error and the close, and nothing was started."""
    await assert_refused(comm, code, close)
    assert await ok_exec_rows(vm) == []
    await leave(comm)


async def test_a_frame_after_the_socket_lost_its_token_starts_nothing(owner, live_vm):
    vm, _ = live_vm
    token, secret = await database_sync_to_async(services.token_create)(user=owner, name="t", actor=owner)
    comm = await open_with_token(vm, secret)
    await database_sync_to_async(services.token_revoke)(token=token, actor=owner)
    # the rights watch closes the socket (4403) ...
    while True:
        f = await comm.receive_output(5)
        if f["type"] == "websocket.close":
            assert f["code"] == 4403
            break
    # ... and a frame the client sends during the close handshake (daphne still delivers
    # frames then) acts no more.
    await comm.send_json_to({"type": "start", "command": ["true"]})
    await asyncio.sleep(2)
    assert await ok_exec_rows(vm) == []
    await leave(comm)


async def test_a_token_expired_since_the_handshake_starts_nothing(owner, live_vm, api):
    vm, _ = live_vm
    _, secret = await database_sync_to_async(services.token_create)(
        user=owner, name="t", actor=owner, expires_at=timezone.now() + timedelta(seconds=1.5)
    )
    comm = await open_with_token(vm, secret)
    await asyncio.sleep(2)  # expired now: POST .../exec/ answers 401
    await comm.send_json_to({"type": "start", "command": ["true"]})
    await assert_start_refused(comm, vm)


async def test_a_user_deactivated_since_the_handshake_starts_nothing(owner, live_vm):
    vm, _ = live_vm
    _, secret = await database_sync_to_async(services.token_create)(user=owner, name="t", actor=owner)
    comm = await open_with_token(vm, secret)
    # deactivated (a database edit: no event; the periodic check comes after 10 s)
    await database_sync_to_async(get_user_model().objects.filter(pk=owner.pk).update)(is_active=False)
    await comm.send_json_to({"type": "start", "command": ["true"]})
    await assert_start_refused(comm, vm)


async def test_a_socket_start_is_audited_with_its_token_like_rest(owner, live_vm, api):
    vm, _ = live_vm
    token, secret = await database_sync_to_async(services.token_create)(user=owner, name="t", actor=owner)

    @database_sync_to_async
    def rest():
        api.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
        r = api.post(f"/api/v1/vms/{vm.pk}/exec/", {"command": ["true"], "wait": False}, format="json")
        assert r.status_code == 202, r.content

    await rest()
    comm = await open_with_token(vm, secret)
    await comm.send_json_to({"type": "start", "command": ["true"]})
    await control(comm, "started")
    await leave(comm)
    rows = await ok_exec_rows(vm)
    assert len(rows) == 2
    assert rows[0].token_id == token.pk
    assert rows[1].token_id == token.pk, "socket start audited without the token"


async def test_a_role_removed_since_the_handshake_starts_nothing(operator, live_vm):
    vm, _ = live_vm
    _, secret = await database_sync_to_async(services.token_create)(user=operator, name="t", actor=operator)
    comm = await open_with_token(vm, secret)
    await database_sync_to_async(
        lambda: operator.groups.clear()
    )()  # no event: ModelBackend's cache on the socket's user
    await comm.send_json_to({"type": "start", "command": ["true"]})
    await assert_start_refused(comm, vm)


async def test_an_object_right_removed_since_the_handshake_starts_nothing(grantee, live_vm):
    from guardian.shortcuts import assign_perm, remove_perm

    vm, _ = live_vm
    await database_sync_to_async(assign_perm)("vms.view_vm", grantee, vm)
    await database_sync_to_async(assign_perm)("vms.exec_vm", grantee, vm)
    _, secret = await database_sync_to_async(services.token_create)(user=grantee, name="t", actor=grantee)
    comm = await open_with_token(vm, secret)
    await database_sync_to_async(remove_perm)("vms.exec_vm", grantee, vm)
    await comm.send_json_to({"type": "start", "command": ["true"]})
    await assert_start_refused(comm, vm)


async def test_a_refused_socket_starts_nothing_on_a_later_frame(owner, live_vm):
    vm, _ = live_vm
    _, secret = await database_sync_to_async(services.token_create)(user=owner, name="t", actor=owner)
    comm = await open_with_token(vm, secret)
    await comm.send_json_to({"type": "nope"})
    assert (await control(comm, "error"))["code"] == "bad_request"
    assert (await comm.receive_output(5))["code"] == 4400
    await comm.send_json_to({"type": "start", "command": ["true"]})
    assert await frames_until_close(comm, timeout=3) == []  # no answer: the frame did not act
    assert await ok_exec_rows(vm) == []
    await leave(comm)


async def test_a_start_whose_consumer_is_cancelled_is_still_audited(owner, live_vm, monkeypatch):
    # daphne cancels a consumer application_close_timeout (10 s) after its client went; a
    # command hostd started then (a slow agent's reply) still gets its audit row.
    from vms.agent_gateway import AgentChannel

    real = AgentChannel.exec_start
    ran = []

    async def slow_reply(self, *a, **kw):
        result = await real(self, *a, **kw)
        ran.append(result["exec_id"])
        await asyncio.sleep(3)  # the reply still in flight
        return result

    monkeypatch.setattr(AgentChannel, "exec_start", slow_reply)
    vm, _ = live_vm
    _, secret = await database_sync_to_async(services.token_create)(user=owner, name="t", actor=owner)
    comm = await open_with_token(vm, secret)
    await comm.send_json_to({"type": "start", "command": ["sh", "-c", "sleep 1"]})
    await asyncio.sleep(1)
    comm.future.cancel()  # what daphne does to an app that outlives its client by 10 s
    await asyncio.sleep(3)
    assert ran, "the command was started in the VM"
    rows = await database_sync_to_async(
        lambda: list(AuditEvent.objects.filter(object_id=str(vm.pk), action="vm.exec"))
    )()
    assert rows, "started exec without any audit row"


async def test_a_project_token_opens_no_exec_socket_outside_its_project(owner, live_vm):
    vm, _ = live_vm  # owner's VM in no project
    project = await database_sync_to_async(services.project_create)(name="P", slug="p", actor=owner)
    _, secret = await database_sync_to_async(services.token_create)(user=owner, name="t", actor=owner, project=project)
    comm = WebsocketCommunicator(
        application,
        f"/ws/vms/{vm.pk}/exec/",
        headers=[
            (b"origin", b"http://localhost"),
            (b"host", b"localhost"),
            (b"authorization", f"Bearer {secret}".encode()),
        ],
    )
    connected, code = await comm.connect(timeout=5)
    assert (connected, code) == (False, 4404)


async def test_read_only_and_bad_tokens_do_not_fall_back_to_the_session(owner, live_vm):
    vm, _ = live_vm
    _, secret = await database_sync_to_async(services.token_create)(user=owner, name="t", actor=owner, read_only=True)
    for value in (f"Bearer {secret}", "Bearer msb_nonsense", f"bEaReR {secret}"):
        comm = WebsocketCommunicator(
            application,
            f"/ws/vms/{vm.pk}/exec/",
            headers=[(b"origin", b"http://localhost"), (b"host", b"localhost"), (b"authorization", value.encode())],
        )
        comm.scope["user"] = owner  # as if a session cookie had authenticated the owner
        connected, code = await comm.connect(timeout=5)
        assert (connected, code) == (False, 4401), value


# ----- a kept socket: "keep_open" runs one command after another on one connection ---------


async def run_on(comm, command, *, keep_open=True):
    """Start ``command`` on an open start socket and follow it to its exit: (exec id, output, result)."""
    await comm.send_json_to({"type": "start", "command": command, "keep_open": keep_open})
    exec_id, output = None, b""
    while True:
        frame = await comm.receive_output(10)
        if frame["type"] == "websocket.close":
            raise AssertionError(f"socket closed ({frame.get('code')}) before the exit")
        if frame.get("bytes") is not None:
            output += frame["bytes"][1:]
            continue
        message = json.loads(frame["text"])
        assert message["type"] != "error", message
        if message["type"] == "started":
            exec_id = message["exec_id"]
        elif message["type"] == "attached":
            assert message["exec_id"] == exec_id and message["offset"] == 0
        elif message["type"] == "exit":
            return exec_id, output, message["result"]


async def test_a_kept_socket_runs_commands_one_after_another_each_audited(owner, live_vm):
    vm, _ = live_vm
    comm, connected, _ = await connect_start(vm, owner)
    assert connected
    first = await run_on(comm, ["sh", "-c", "echo one"])
    second = await run_on(comm, ["sh", "-c", "echo two >&2; exit 3"])
    assert await comm.receive_nothing(0.3)  # still open after the second exit
    last = await run_on(comm, ["echo", "three"], keep_open=False)
    assert [(out, result["exit_code"]) for _, out, result in (first, second, last)] == [
        (b"one\n", 0),
        (b"two\n", 3),
        (b"three\n", 0),
    ]
    assert len({first[0], second[0], last[0]}) == 3  # three commands, three execs
    assert (await comm.receive_output(5)) == {"type": "websocket.close", "code": 1000}  # no keep_open: closed
    rows = sorted(await ok_exec_rows(vm), key=lambda row: row.id)
    assert [row.after["exec_id"] for row in rows] == [first[0], second[0], last[0]]


async def test_a_start_while_a_command_runs_is_refused_and_the_command_goes_on(owner, live_vm):
    vm, _ = live_vm
    comm, connected, _ = await connect_start(vm, owner)
    assert connected
    await comm.send_json_to(
        {"type": "start", "command": ["sh", "-c", "read x; echo got $x"], "stdin_open": True, "keep_open": True}
    )
    await control(comm, "attached")
    await comm.send_json_to({"type": "start", "command": ["true"]})
    assert (await control(comm, "error"))["code"] == "conflict"
    await comm.send_json_to({"type": "stdin", "data": "late\n"})
    output = b""
    while True:
        frame = await comm.receive_output(10)
        if frame.get("bytes") is not None:
            output += frame["bytes"][1:]
        elif json.loads(frame["text"])["type"] == "exit":
            break
    assert output == b"got late\n"
    assert len(await ok_exec_rows(vm)) == 1  # the refused start started nothing
    # a late ack of the finished command changes nothing; the next start still runs
    await comm.send_json_to({"type": "ack", "offset": 9})
    assert (await run_on(comm, ["echo", "next"]))[1] == b"next\n"
    await comm.disconnect()


async def test_a_kept_socket_with_no_next_start_is_closed(owner, live_vm, settings):
    settings.SANDBOX_EXEC_SOCKET_IDLE_SECONDS = 0.5
    vm, _ = live_vm
    comm, connected, _ = await connect_start(vm, owner)
    assert connected
    await run_on(comm, ["true"])
    assert (await control(comm, "error"))["code"] == "timeout"
    assert (await comm.receive_output(5)) == {"type": "websocket.close", "code": 4408}
    await comm.disconnect()


async def test_a_kept_socket_authenticates_each_start_again(owner, live_vm):
    vm, _ = live_vm
    _, secret = await database_sync_to_async(services.token_create)(user=owner, name="t", actor=owner)
    comm = await open_with_token(vm, secret)
    await run_on(comm, ["true"])
    # deactivated between two commands (a database edit: no event, no periodic check yet)
    await database_sync_to_async(get_user_model().objects.filter(pk=owner.pk).update)(is_active=False)
    await comm.send_json_to({"type": "start", "command": ["echo", "after"]})
    await assert_refused(comm)
    assert len(await ok_exec_rows(vm)) == 1  # only the first command
    await leave(comm)


async def test_a_kept_socket_counts_each_start_against_the_exec_budget(owner, live_vm, settings):
    settings.SANDBOX_RATE_LIMITS = {"exec": "2/min", "user": "100/min"}
    await database_sync_to_async(cache.clear)()  # budgets charged by earlier runs
    vm, _ = live_vm
    comm, connected, _ = await connect_start(vm, owner)
    assert connected
    await run_on(comm, ["true"])
    await run_on(comm, ["true"])
    await comm.send_json_to({"type": "start", "command": ["true"], "keep_open": True})
    assert (await control(comm, "error"))["code"] == "throttled"
    assert (await comm.receive_output(5)) == {"type": "websocket.close", "code": 4429}
    assert len(await ok_exec_rows(vm)) == 2
    await comm.disconnect()


async def test_keep_open_must_be_a_boolean(owner, live_vm):
    vm, _ = live_vm
    comm, connected, _ = await connect_start(vm, owner)
    assert connected
    await comm.send_json_to({"type": "start", "command": ["true"], "keep_open": "yes"})
    assert (await control(comm, "error"))["code"] == "bad_request"
    assert (await comm.receive_output(5)) == {"type": "websocket.close", "code": 4400}
    assert await ok_exec_rows(vm) == []
    await comm.disconnect()


async def test_the_hostd_connection_forgets_each_finished_stream(owner, live_vm):
    """A kept socket's one hostd connection carries stream after stream: each one's entry goes
    when it ends (hostd ends it with ``exit``), not when the socket closes."""
    from vms.agent_gateway import AgentChannel

    vm, _ = live_vm
    channel = await AgentChannel.open(timeout=10)
    try:
        for _ in range(3):
            started = await channel.exec_start(str(vm.pk), {"argv": ["true"]}, max_running=4)
            sub = await channel.exec_attach(str(vm.pk), started["exec_id"])
            assert [frame.header["ev"] async for frame in sub][-1] == "exit"
        assert channel._client._subs == {}
    finally:
        await channel.close()


# ----- kept sockets between two commands ----------------------------------------------------


def paced(app, pause):
    """``app`` with daphne's paced send (sandbox_site.daphne_limits.handle_reply): each frame
    is written first, then ``send`` waits (``wait_for_room``) while a slow reader's buffer
    drains; meanwhile the client already has the frame and may answer it."""

    async def wrapped(scope, receive, send):
        async def paced_send(message):
            await send(message)
            if message["type"] == "websocket.send":
                await asyncio.sleep(pause)

        return await app(scope, receive, paced_send)

    return wrapped


async def test_a_start_sent_on_the_exit_of_a_kept_command_is_not_refused_as_a_conflict(owner, live_vm):
    """The documented client: the next start frame once the ``exit`` came. The consumer resets
    for the next command only after its ``send`` of the exit returned, so with daphne's paced
    sends the start arrives while the finished exec is still the socket's: ``conflict``."""
    vm, _ = live_vm
    comm = WebsocketCommunicator(
        paced(application, 0.3),
        f"/ws/vms/{vm.pk}/exec/",
        headers=[(b"origin", b"http://localhost"), (b"host", b"localhost")],
    )
    comm.scope["user"] = owner
    comm.scope["client"] = ("127.0.0.1", 40000)
    connected, _ = await comm.connect(timeout=5)
    assert connected
    await run_on(comm, ["true"])
    # run_on sends the next start frame the moment the exit arrived, as benchmarks/exec.py does
    assert (await run_on(comm, ["echo", "next"]))[1] == b"next\n"
    await leave(comm)


async def test_acks_do_not_keep_an_idle_kept_socket_open(owner, live_vm, settings):
    settings.SANDBOX_EXEC_SOCKET_IDLE_SECONDS = 0.5
    vm, _ = live_vm
    comm, connected, _ = await connect_start(vm, owner)
    assert connected
    await run_on(comm, ["true"])
    for _ in range(8):  # 2.4 s of acks and no start frame: each ack restarts the idle period
        if comm.future.done():
            break
        await comm.send_json_to({"type": "ack", "offset": 0})
        await asyncio.sleep(0.3)
    frames = await frames_until_close(comm, timeout=0.1)  # what came during those 2.4 s
    assert {"type": "websocket.close", "code": 4408} in frames, "still open, holding its hostd connection"
    await leave(comm)


async def test_a_frame_of_the_finished_command_does_not_close_a_kept_socket(owner, live_vm):
    """A resize (or eof, stdin, signal) the client sent while the command was exiting reaches
    the socket after the exit: the kept socket is closed (4400) instead of ignoring it."""
    vm, _ = live_vm
    comm, connected, _ = await connect_start(vm, owner)
    assert connected
    await run_on(comm, ["true"])
    await comm.send_json_to({"type": "resize", "rows": 40, "cols": 120})  # in flight at the exit
    await comm.send_to(bytes_data=b"late\n")
    assert (await run_on(comm, ["echo", "next"]))[1] == b"next\n"
    await leave(comm)


async def test_a_kept_socket_reads_rights_again_for_each_start(grantee, operator, live_vm):
    """(sound) Nothing of one start's request_perm_cache, nor the handshake user's caches,
    carries over to the next start: an object right or a role taken away in between (no
    event) refuses it."""
    vm, _ = live_vm
    await database_sync_to_async(assign_perm)("vms.view_vm", grantee, vm)
    await database_sync_to_async(assign_perm)("vms.exec_vm", grantee, vm)
    for user, take_away in (
        (grantee, lambda: remove_perm("vms.exec_vm", grantee, vm)),
        (operator, lambda: operator.groups.clear()),
    ):
        _, secret = await database_sync_to_async(services.token_create)(user=user, name="t", actor=user)
        comm = await open_with_token(vm, secret)
        await run_on(comm, ["true"])
        await database_sync_to_async(take_away)()
        await comm.send_json_to({"type": "start", "command": ["echo", "after"], "keep_open": True})
        await assert_refused(comm)
        await leave(comm)


async def test_a_start_after_the_vm_was_deleted_is_refused_with_not_found(admin_user, live_vm, monkeypatch):
    # (an admin keeps the right on any VM: the state check is what meets the missing row)
    from vms import exec_services

    vm, _ = live_vm
    comm, connected, _ = await connect_start(vm, admin_user)
    assert connected
    await run_on(comm, ["true"])
    monkeypatch.setattr(exec_services, "ROW_FRESH_SECONDS", 0)  # the socket's VM object is old now
    await database_sync_to_async(lambda: type(vm).objects.filter(pk=vm.pk).delete())()
    await comm.send_json_to({"type": "start", "command": ["true"]})
    await assert_refused(comm, "not_found", 4404)
    await leave(comm)


@pytest.mark.parametrize("frame", ["stdin", "signal"])
async def test_a_frame_acts_no_more_a_second_after_its_user_was_deactivated(owner, live_vm, frame):
    """A deactivation made in the database (no event reaches the socket; the periodic re-check
    comes after 10 s): stdin and signal frames read their user again at most a second old."""
    vm, _ = live_vm
    exec_id = await start(vm, owner, ["cat"], stdin_open=True)
    comm, connected, _ = await connect(vm, exec_id, owner)
    assert connected
    await control(comm, "attached")
    await comm.send_to(bytes_data=b"before\n")
    assert await comm.receive_from(10) == b"\x01before\n"
    await database_sync_to_async(get_user_model().objects.filter(pk=owner.pk).update)(is_active=False)
    await asyncio.sleep(1.1)
    if frame == "stdin":
        await comm.send_to(bytes_data=b"after\n")
    else:
        await comm.send_json_to({"type": "signal", "signal": "KILL"})
    frames = await assert_refused(comm)
    assert not any(isinstance(f, dict) and f.get("bytes") == b"\x01after\n" for f in frames)
    await leave(comm)
    await database_sync_to_async(get_user_model().objects.filter(pk=owner.pk).update)(is_active=True)
    page = await database_sync_to_async(exec_services.vm_exec_output)(vm=vm, actor=owner, exec_id=exec_id)
    assert page["running"]  # the KILL never came either
    assert "".join(chunk["data"] for chunk in page["chunks"]) == "before\n"  # nor the stdin
