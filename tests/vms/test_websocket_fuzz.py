"""Every websocket consumer (events, console, exec) answers hostile frames with an error frame
and keeps serving: garbage text, binary where not expected, huge and deeply nested frames,
unknown types, NaN/Infinity (issue 14). No frame crashes a consumer (1011) or leaks a task."""

from __future__ import annotations

import asyncio
import json

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from sandbox_site.asgi import application
from tests.vms.test_console_consumer import connect as console_connect
from tests.vms.test_console_consumer import hello, hostd, make_vm, root  # noqa: F401 - fixtures
from vms import exec_services

pytestmark = pytest.mark.django_db(transaction=True)

HEADERS = [(b"origin", b"http://localhost"), (b"host", b"localhost")]

# (text, bytes) frames no consumer may crash on.
HOSTILE_TEXT = [
    "",
    "not json",
    "[1, 2]",
    "null",
    '"\\ud800"',
    '{"type": "resize", "rows": Infinity, "cols": NaN}',
    '{"type": "resize", "rows": 1e400, "cols": 80}',
    '{"type": "resize", "rows": "x", "cols": 80}',
    '{"type": "resize", "rows": 100000000000000000000000, "cols": 80}',
    '{"type": "signal", "signal": "\u00b2"}',
    '{"type": "signal", "signal": {"a": 1}}',
    '{"type": "stdin", "data": 5}',
    '{"type": "ack", "offset": NaN}',
    '{"type": "nope"}',
    '{"type": ["ack"]}',
    '{"subscribe": ["x"]}',
    '{"subscribe": "not-a-uuid"}',
    '{"subscribe": "{12345678-1234-5678-1234-567812345678}"}',
    "[" * 5000 + "]" * 5000,
    '{"a":' * 40 + "1" + "}" * 40,
    json.dumps({"type": "stdin", "data": "x" * (200 << 10)}),
]


async def _drain(comm, timeout: float = 0.5) -> list[dict]:
    """Messages that arrive within ``timeout``; fails on a close."""
    out = []
    while True:
        # receive_output's timeout would cancel the consumer: look first.
        if await comm.receive_nothing(timeout=timeout):
            return out
        message = await comm.receive_output(timeout=5)
        assert message["type"] != "websocket.close", f"the consumer closed: {message}"
        out.append(message)


async def _fuzz(comm, *, binary: bool) -> list[dict]:
    replies = []
    for text in HOSTILE_TEXT:
        await comm.send_input({"type": "websocket.receive", "text": text})
        replies += await _drain(comm, 0.3)
    if binary:
        await comm.send_to(bytes_data=b"\x00\xff" * 1000)
        replies += await _drain(comm, 0.3)
    return replies


def _errors(replies: list[dict]) -> list[dict]:
    texts = [json.loads(r["text"]) for r in replies if r.get("text")]
    return [t for t in texts if t.get("type") == "error" or "error" in t]


async def test_the_events_consumer_survives_hostile_frames(owner, vm):
    comm = WebsocketCommunicator(application, "/ws/vms/events/", headers=HEADERS)
    comm.scope["user"] = owner
    assert (await comm.connect(timeout=5))[0]
    replies = await _fuzz(comm, binary=True)
    assert len(_errors(replies)) >= len(HOSTILE_TEXT)  # each refused, none crashed the socket
    await comm.send_json_to({"subscribe": str(vm.pk).upper()})
    assert await comm.receive_json_from(timeout=5) == {"subscribed": str(vm.pk)}
    await comm.disconnect()


async def test_the_console_consumer_survives_hostile_frames(make_vm, owner):  # noqa: F811
    vm = await database_sync_to_async(make_vm)()
    comm, connected, _ = await console_connect(vm, owner)
    assert connected
    await hello(comm)
    replies = await _fuzz(comm, binary=False)
    errors = [e for e in _errors(replies) if e.get("code") == "bad_request"]
    assert len(errors) >= 10
    await comm.send_to(text_data=json.dumps({"type": "ping"}))
    for _ in range(50):
        message = await comm.receive_output(timeout=5)
        assert message["type"] != "websocket.close"
        if message.get("text") and json.loads(message["text"]).get("type") == "pong":
            break
    else:
        raise AssertionError("no pong after the hostile frames")
    await comm.disconnect()


async def test_the_exec_consumer_survives_hostile_frames_and_leaks_no_task(owner, live_vm):
    vm, _root = live_vm
    exec_id = await database_sync_to_async(
        lambda: exec_services.vm_exec_start(vm=vm, actor=owner, command="sleep 60", wait=False)["exec_id"]
    )()
    comm = WebsocketCommunicator(application, f"/ws/vms/{vm.pk}/execs/{exec_id}/", headers=HEADERS)
    comm.scope["user"] = owner
    assert (await comm.connect(timeout=5))[0]
    replies = await _fuzz(comm, binary=False)
    errors = _errors(replies)
    assert len(errors) >= 15, errors
    assert {e["code"] for e in errors} <= {"bad_request", "invalid"}
    await comm.send_to(text_data=json.dumps({"type": "signal", "signal": "KILL"}))
    while True:
        message = await comm.receive_output(timeout=10)
        if message["type"] == "websocket.close":
            break
        if message.get("text") and json.loads(message["text"])["type"] == "exit":
            assert json.loads(message["text"])["result"]["signal"] in (9, "KILL", "SIGKILL")
    await comm.wait(timeout=5)
    await asyncio.sleep(0.2)
    left = {t.get_coro().__qualname__ for t in asyncio.all_tasks()}
    assert not left & {"VmExecConsumer._pump", "AsyncHostdClient._read_loop"}, left
