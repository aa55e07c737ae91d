"""A VM on another host: the web API reaches that host's hostd over mutual TLS only (this
machine's hostd socket leads nowhere, and there is no agent socket to fall back to): exec with
and without waiting, an exec's output through its websocket, a file round trip, the console
log download."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator

from accounts.models import AuditEvent
from sandbox_site.asgi import application
from tests.factories import HostFactory
from tests.hostd.runner import Hostd
from tests.waiting import wait_until
from vms import pki
from vms.models import VM

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def remote_vm(vm_runtime, settings):
    vm, root = vm_runtime
    settings.SANDBOX_PKI_DIR = root / "pki"
    files = pki.host_cert_issue("h2", "127.0.0.1")
    hostd = Hostd(root, tls_listen="127.0.0.1:0", tls_cert=files.cert, tls_key=files.key, tls_ca=pki.ca_files().cert)
    hostd.start()
    host = HostFactory(name="h2", hostd_address=f"127.0.0.1:{hostd.daemon.tls_port}")
    VM.objects.filter(pk=vm.pk).update(host=host)
    vm.refresh_from_db()
    settings.SANDBOX_HOSTD_SOCKET = root / "not-this-host.sock"  # only TLS leads to h2's hostd
    try:
        yield vm, root
    finally:
        hostd.stop()


async def _joined(chunks) -> bytes:
    return b"".join([chunk async for chunk in chunks])


async def _exec_output(vm, exec_id: str, owner) -> tuple[bytes, dict]:
    comm = WebsocketCommunicator(
        application,
        f"/ws/vms/{vm.pk}/execs/{exec_id}/",
        headers=[(b"origin", b"http://localhost"), (b"host", b"localhost")],
    )
    comm.scope["user"] = owner
    connected, _ = await comm.connect(timeout=10)
    assert connected
    out = b""
    while True:
        message = await comm.receive_output(timeout=20)
        assert message["type"] != "websocket.close", message
        if message.get("bytes") is not None:
            out += message["bytes"][1:]  # first byte: the stream
            continue
        event = json.loads(message["text"])
        if event.get("type") == "exit":
            await comm.disconnect()
            return out, event


def test_exec_and_files_of_a_vm_on_another_host_go_through_its_hostd_over_tls(api, owner, remote_vm):
    vm, root = remote_vm
    api.as_user(owner)
    base = f"/api/v1/vms/{vm.pk}/"
    body = api.post(base + "exec/", {"command": "echo far away"}, format="json").json()
    assert (body["stdout"], body["exit_code"]) == ("far away\n", 0)

    started = api.post(base + "exec/", {"command": "seq 1 3", "wait": False}, format="json")
    assert started.status_code == 202, started.content
    exec_id = started.json()["exec_id"]
    page = wait_until(lambda: (p := api.get(base + f"execs/{exec_id}/").json())["running"] is False and p)
    assert "".join(c["data"] for c in page["chunks"]) == "1\n2\n3\n"
    out, event = async_to_sync(_exec_output)(vm, exec_id, owner)  # its websocket replays it from h2
    assert out == b"1\n2\n3\n" and event["result"]["exit_code"] == 0

    blob = os.urandom(200_000)
    target = root / "far.bin"
    put = api.put(base + f"files/?path={target}", blob, content_type="application/octet-stream")
    assert put.status_code == 201, put.content
    got = api.get(base + f"files/?path={target}")
    assert (got.status_code, got["X-Checksum-Sha256"]) == (200, hashlib.sha256(blob).hexdigest())
    assert async_to_sync(_joined)(got.streaming_content) == blob
    assert AuditEvent.objects.filter(action="vm.exec", object_id=str(vm.pk)).count() == 2


def test_a_vm_on_another_host_is_never_reached_through_this_machine(api, owner, vm_runtime, settings):
    """Its host's hostd is down: the request fails clearly, without trying this machine's
    hostd or an agent socket here (the stand-in's agent socket is on this disk, and unused)."""
    vm, root = vm_runtime
    settings.SANDBOX_PKI_DIR = root / "pki"
    host = HostFactory(name="h3", hostd_address="127.0.0.1:9")  # nothing listens there
    VM.objects.filter(pk=vm.pk).update(host=host)
    live = Hostd(root)  # this machine's hostd, in front of the stand-in: must not be used
    live.start()
    try:
        api.as_user(owner)
        response = api.post(f"/api/v1/vms/{vm.pk}/exec/", {"command": "true"}, format="json")
        assert response.status_code == 503, response.content
        assert response.json()["error"]["code"] == "hostd_unavailable"
    finally:
        live.stop()


def test_the_console_log_of_a_vm_on_another_host_comes_from_that_hosts_disk(api, owner, remote_vm, settings, tmp_path):
    vm, root = remote_vm
    (root / str(vm.pk) / "serial.log").write_bytes(b"booted on h2\n" * 1000)
    settings.SANDBOX_RUNTIME_DIR = tmp_path  # this machine's disk has no log of that VM
    api.as_user(owner)
    response = api.get(f"/api/v1/vms/{vm.pk}/console/log/")
    assert response.status_code == 200, response.content
    assert b"".join(response.streaming_content) == b"booted on h2\n" * 1000
