"""Exec and file endpoints refuse malformed input with a 400 before the guest sees it, and
file transfers of non-regular files are refused or bounded (issue 14). A stand-in VMM runs the
real guest agent code on this host (tests/vms/conftest.py ``live_vm``)."""

from __future__ import annotations

import os
import time

import pytest

pytestmark = pytest.mark.django_db(transaction=True)


def error_of(response) -> dict:
    assert response["Content-Type"].startswith("application/json"), response.content[:200]
    return response.json()["error"]


def test_bad_signals_and_pty_sizes_are_a_400(api, owner, live_vm):
    vm, _root = live_vm
    base = f"/api/v1/vms/{vm.pk}/"
    client = api.as_user(owner)
    started = client.post(base + "exec/", {"command": "sleep 30", "wait": False}, format="json")
    exec_id = started.json()["exec_id"]
    for sig in ("²", "١٥", "0", "65", "TE RM", "-9", "9" * 40):
        response = client.post(base + f"execs/{exec_id}/signal/", {"signal": sig}, format="json")
        assert response.status_code == 400, (sig, response.content)
        assert error_of(response)["code"] == "invalid"
    for pty in ({"rows": "x"}, {"cols": 1e400}, {"rows": 10**30}, {"rows": True}, {"term": "a b"}, {"term": 5}):
        body = {"command": "true", "pty": pty}
        response = client.generic("POST", base + "exec/", _json(body), content_type="application/json")
        assert response.status_code == 400, (pty, response.content)
    assert client.post(base + f"execs/{exec_id}/signal/", {"signal": "9"}, format="json").status_code == 200
    for query in ("offset=x", "offset=-1", "limit=²", f"offset={2**64}"):
        assert client.get(base + f"execs/{exec_id}/?{query}").status_code == 400, query


def _json(body) -> str:
    import json

    return json.dumps(body).replace("1e+400", "1e400").replace("Infinity", "1e400")


def test_bad_owner_and_mode_on_upload_are_a_400_and_leak_nothing(api, owner, live_vm):
    vm, root = live_vm
    client = api.as_user(owner)
    base = f"/api/v1/vms/{vm.pk}/files/?path={root}/f.txt"
    for query in (
        "&owner=%00",
        "&owner=a%20b",
        "&owner=r%C3%B6ot",
        "&mode=-1",
        "&mode=0o8",
        "&mode=77777",
        "&mode=%D9%A7",
    ):
        response = client.put(base + query, b"data", content_type="application/octet-stream")
        assert response.status_code == 400, (query, response.content)
        assert "Error" not in error_of(response)["message"]
    assert not (root / "f.txt").exists()
    ok = client.put(base + "&owner=0:0&mode=0640", b"data", content_type="application/octet-stream")
    assert ok.status_code == 201, ok.content


@pytest.mark.parametrize("kind", ["device", "fifo", "proc_mem", "symlink_to_device"])
def test_downloads_of_non_regular_files_are_refused_quickly(api, owner, live_vm, kind):
    vm, root = live_vm
    path = {"device": "/dev/zero", "proc_mem": "/proc/self/mem"}.get(kind, f"{root}/{kind}")
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink_to_device":
        os.symlink("/dev/zero", path)
    started = time.monotonic()
    response = api.as_user(owner).get(f"/api/v1/vms/{vm.pk}/files/?path={path}")
    assert time.monotonic() - started < 20
    assert 400 <= response.status_code < 500, response.content
    assert error_of(response)["code"] in ("bad_request", "io_error")
