"""Exec and files API end to end against a real hostd and a stand-in VMM running the real
guest agent code on this host (tests/hostd/fake_vmm.py). Its permission matrix is declared
with every other endpoint's in tests/accounts/test_permission_matrix.py."""

from __future__ import annotations

import hashlib
import os

import pytest
from asgiref.sync import async_to_sync

from accounts.models import AuditEvent
from tests.waiting import wait_until


@pytest.mark.django_db(transaction=True)
def test_exec_and_files_end_to_end(api, owner, live_vm):
    vm, root = live_vm
    api.as_user(owner)
    base = f"/api/v1/vms/{vm.pk}/"
    body = api.post(base + "exec/", {"command": "echo out; echo err >&2; exit 3"}, format="json").json()
    assert (body["stdout"], body["stderr"], body["exit_code"], body["truncated"]) == ("out\n", "err\n", 3, False)
    assert api.post(base + "exec/", {"command": ["cat"], "stdin": "abc"}, format="json").json()["stdout"] == "abc"
    started = api.post(base + "exec/", {"command": "seq 1 5", "wait": False, "tag": "t"}, format="json")
    assert started.status_code == 202
    exec_id = started.json()["exec_id"]
    listed = api.get(base + "execs/?tag=t").json()["results"]
    assert [e["exec_id"] for e in listed] == [exec_id]
    page = wait_until(lambda: _finished(api.get(base + f"execs/{exec_id}/?offset=4").json()))
    assert page["offset"] == 4 and "".join(c["data"] for c in page["chunks"]) == "3\n4\n5\n"
    assert api.get(base + "execs/nope/").status_code == 404

    target = root / "file.bin"
    blob = os.urandom(300000)
    put = api.put(base + f"files/?path={target}&mode=0600", blob, content_type="application/octet-stream")
    assert put.status_code == 201, put.content
    assert put.json()["sha256"] == hashlib.sha256(blob).hexdigest()
    assert target.read_bytes() == blob and target.stat().st_mode & 0o777 == 0o600
    assert api.get(base + f"files/stat/?path={target}").json()["size"] == len(blob)
    got = api.get(base + f"files/?path={target}")
    assert (got.status_code, got["X-Checksum-Sha256"]) == (200, hashlib.sha256(blob).hexdigest())
    assert async_to_sync(_joined)(got.streaming_content) == blob
    too_big = api.put(
        base + f"files/?path={root}/big.bin", b"x" * ((1 << 20) + 1), content_type="application/octet-stream"
    )
    assert too_big.status_code == 413 and not (root / "big.bin").exists()
    assert not [p for p in root.iterdir() if "sbx-upload" in p.name]
    assert api.post(base + "files/mkdir/", {"path": f"{root}/d/e"}, format="json").status_code == 201
    assert api.delete(base + f"files/?path={root}/d&recursive=1").status_code == 204
    actions = set(AuditEvent.objects.filter(object_id=str(vm.pk)).values_list("action", flat=True))
    assert {"vm.exec", "vm.file_write", "vm.file_mkdir", "vm.file_remove"} <= actions


async def _joined(chunks) -> bytes:
    return b"".join([chunk async for chunk in chunks])


def _finished(page: dict) -> dict | None:
    return None if page["running"] else page


@pytest.mark.django_db(transaction=True)
def test_a_waited_exec_uses_one_hostd_connection_and_reads_output_only_when_there_is_some(
    api, owner, live_vm, monkeypatch
):
    from vms.hostd.client import HostdClient

    vm, _root = live_vm
    connects, ops = [], []
    real_connect, real_agent_send = HostdClient.connect, HostdClient.agent_send

    def connect(self):
        if self._sock is None:
            connects.append(self)
        return real_connect(self)

    def agent_send(self, vm_id, op, *args, **kwargs):  # every agent request goes through it
        ops.append(op)
        return real_agent_send(self, vm_id, op, *args, **kwargs)

    monkeypatch.setattr(HostdClient, "connect", connect)
    monkeypatch.setattr(HostdClient, "agent_send", agent_send)
    api.as_user(owner)
    url = f"/api/v1/vms/{vm.pk}/exec/"
    quiet = api.post(url, {"command": ["true"]}, format="json").json()
    assert (quiet["exit_code"], quiet["stdout"], quiet["truncated"]) == (0, "", False)
    assert (ops, len(connects)) == (["exec_start", "exec_wait"], 1)
    ops.clear(), connects.clear()
    loud = api.post(url, {"command": "echo hi"}, format="json").json()
    assert (loud["exit_code"], loud["stdout"]) == (0, "hi\n")
    assert (ops, len(connects)) == (["exec_start", "exec_wait", "exec_read"], 1)
    assert AuditEvent.objects.filter(object_id=str(vm.pk), action="vm.exec").count() == 2
