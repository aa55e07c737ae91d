"""Exec and files API: the permission matrix (owner / grantee without exec / stranger) on
every endpoint, and the API end to end against a real hostd and a stand-in VMM running the
real guest agent code on this host (tests/hostd/fake_vmm.py)."""

from __future__ import annotations

import hashlib
import os

import pytest
from asgiref.sync import async_to_sync
from guardian.shortcuts import assign_perm

from accounts.models import AuditEvent
from tests.waiting import wait_until

ENDPOINTS = [
    ("exec", "post", "exec/", {"command": "true"}),
    ("execs", "get", "execs/", None),
    ("exec-detail", "get", "execs/abc/", None),
    ("stdin", "post", "execs/abc/stdin/", {"data": "x"}),
    ("signal", "post", "execs/abc/signal/", {"signal": "TERM"}),
    ("file-get", "get", "files/?path=/etc/hostname", None),
    ("file-delete", "delete", "files/?path=/tmp/x", None),
    ("file-stat", "get", "files/stat/?path=/", None),
    ("file-list", "get", "files/list/?path=/", None),
    ("file-mkdir", "post", "files/mkdir/", {"path": "/tmp/d"}),
]


@pytest.fixture
def shared_vm(vm, grantee):
    for perm in ("view", "power", "console"):
        assign_perm(f"vms.{perm}_vm", grantee, vm)
    return vm


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=[e[0] for e in ENDPOINTS])
@pytest.mark.parametrize("persona", ["owner", "grantee", "stranger"])
def test_it_needs_the_exec_permission(request, api, shared_vm, persona, endpoint):
    _, method, suffix, body = endpoint
    user = request.getfixturevalue(persona)
    api.as_user(user)
    response = getattr(api, method)(f"/api/v1/vms/{shared_vm.pk}/{suffix}", body, format="json")
    if persona == "stranger":
        assert response.status_code == 404
    elif persona == "grantee":
        assert response.status_code == 403
        assert AuditEvent.objects.filter(actor_id=user.pk, result="denied").exists()
    else:
        assert response.status_code == 409  # allowed; the VM is stopped
        assert response.json()["error"]["code"] == "conflict"


def test_an_upload_needs_the_exec_permission_too(api, shared_vm, grantee, stranger):
    url = f"/api/v1/vms/{shared_vm.pk}/files/?path=/root/x"
    api.as_user(grantee)
    assert api.put(url, b"data", content_type="application/octet-stream").status_code == 403
    api.as_user(stranger)
    assert api.put(url, b"data", content_type="application/octet-stream").status_code == 404


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
