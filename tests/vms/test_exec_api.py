"""Exec and files API: the permission matrix (owner / grantee without exec / stranger) on
every endpoint, and the API end to end against a real hostd and a stand-in VMM running the
real guest agent code on this host (tests/hostd/fake_vmm.py)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from guardian.shortcuts import assign_perm

from accounts.models import AuditEvent
from tests.hostd.test_hostd import FAKE_VMM, Hostd
from vms.models import VM

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


@pytest.fixture
def live_vm(vm, settings):
    """The owner's VM 'running' on a stand-in VMM, with a real hostd in front of it."""
    root = Path(tempfile.mkdtemp(prefix="api-", dir="/tmp"))
    settings.SANDBOX_RUNTIME_DIR = root
    settings.SANDBOX_HOSTD_SOCKET = root / "hostd.sock"
    settings.SANDBOX_FILE_UPLOAD_MAX_BYTES = 1 << 20
    rd = root / str(vm.pk)
    rd.mkdir()
    (rd / "spec.json").write_text("{}")
    proc = subprocess.Popen([sys.executable, str(FAKE_VMM), str(rd)], start_new_session=True)
    deadline = time.monotonic() + 10
    while not (rd / "agent.sock").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    hostd = Hostd(root)
    hostd.start()
    VM.objects.filter(pk=vm.pk).update(state="running")
    vm.refresh_from_db()
    try:
        yield vm, root
    finally:
        hostd.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        subprocess.run(["rm", "-rf", str(root)], check=False)


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
    time.sleep(0.5)
    listed = api.get(base + "execs/?tag=t").json()["results"]
    assert [e["exec_id"] for e in listed] == [exec_id]
    page = api.get(base + f"execs/{exec_id}/?offset=4").json()
    assert page["offset"] == 4 and "".join(c["data"] for c in page["chunks"]) == "3\n4\n5\n"
    assert api.get(base + "execs/nope/").status_code == 404

    target = root / "file.bin"
    blob = os.urandom(300000)
    put = api.put(base + f"files/?path={target}&mode=0600", blob, content_type="application/octet-stream")
    assert put.status_code == 201, put.content
    assert put.json()["sha256"] == hashlib.sha256(blob).hexdigest()
    assert target.read_bytes() == blob and target.stat().st_mode & 0o777 == 0o600
    assert api.get(base + f"files/stat/?path={target}").json()["size"] == len(blob)
    too_big = api.put(
        base + f"files/?path={root}/big.bin", b"x" * ((1 << 20) + 1), content_type="application/octet-stream"
    )
    assert too_big.status_code == 413 and not (root / "big.bin").exists()
    assert not [p for p in root.iterdir() if "sbx-upload" in p.name]
    assert api.post(base + "files/mkdir/", {"path": f"{root}/d/e"}, format="json").status_code == 201
    assert api.delete(base + f"files/?path={root}/d&recursive=1").status_code == 204
    actions = set(AuditEvent.objects.filter(object_id=str(vm.pk)).values_list("action", flat=True))
    assert {"vm.exec", "vm.file_write", "vm.file_mkdir", "vm.file_remove"} <= actions
