"""Audit gaps a tenant could hide in: admin-site edits, file downloads, console sessions (bytes in
and out, takeovers), exec stdin and signals over every transport, and a request id the
client cannot choose."""

from __future__ import annotations

import json

import pytest
from channels.db import database_sync_to_async
from django.test import Client
from django.utils import timezone

from accounts.audit import audit_chain_verify
from accounts.models import ApiToken, AuditEvent, UserQuota
from accounts.services import token_create
from tests.factories import PASSWORD, VmFactory
from vms import agent_gateway, exec_services


def _rows(action):
    return list(AuditEvent.objects.filter(action=action).order_by("id"))


def _admin_client(user):
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def test_un_revoking_a_token_in_the_admin_is_audited(admin_user, owner):
    token, _ = token_create(user=owner, name="ci", actor=owner)
    ApiToken.objects.filter(pk=token.pk).update(revoked_at=timezone.now())
    client = _admin_client(admin_user)
    response = client.post(
        f"/admin/accounts/apitoken/{token.pk}/change/",
        {"name": "ci", "read_only": "", "expires_at_0": "", "expires_at_1": "", "revoked_at_0": "", "revoked_at_1": ""},
    )
    assert response.status_code == 302, response.content[:2000]
    (row,) = _rows("admin.change")
    assert row.actor_id == admin_user.pk and row.object_id == str(token.pk) and row.object_owner_id == owner.pk
    assert row.before["revoked_at"] is not None and row.after == {"revoked_at": None}
    assert audit_chain_verify().ok


def test_admin_adds_and_deletes_and_user_edits_are_audited_without_secrets(admin_user, owner):
    client = _admin_client(admin_user)
    response = client.post(
        "/admin/accounts/userquota/add/",
        {"user": owner.pk, "max_vms": 99, "max_vcpus": 64, "max_memory_mib": 65536, "max_disk_gib": 1000},
    )
    assert response.status_code == 302, response.content[:2000]
    (added,) = _rows("admin.add")
    assert added.after["max_vms"] == 99 and added.object_owner_id == owner.pk
    quota = UserQuota.objects.get(user=owner)
    response = client.post(f"/admin/accounts/userquota/{quota.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert _rows("admin.delete")[0].before["max_vms"] == 99
    response = client.post(
        "/admin/auth/user/",
        {"action": "delete_selected", "_selected_action": [owner.pk], "post": "yes"},
    )
    assert response.status_code == 302
    deleted = [r for r in _rows("admin.delete") if r.object_type == "auth.user"]
    assert deleted and deleted[0].before["password"] == "(secret)"
    assert PASSWORD not in json.dumps([r.before for r in deleted])


class _Gateway:
    def __init__(self):
        self.calls = []

    def agent_call(self, vm, op, args=None, data=b"", *, timeout=30.0):
        self.calls.append((op, args, data))
        return {}, b""

    def file_download_open(self, vm, path, *, timeout):
        return {"handle": "h1", "size": 5, "sha256": "ab" * 32, "mode": 0o644}


@pytest.fixture
def running_vm(owner, monkeypatch):
    gateway = _Gateway()
    monkeypatch.setattr(exec_services, "agent_call", gateway.agent_call)
    monkeypatch.setattr(agent_gateway, "file_download_open", gateway.file_download_open)
    monkeypatch.setattr(exec_services, "_require_running", lambda vm: None)
    return VmFactory(owner=owner, state="running")


def test_file_downloads_are_audited(api, owner, running_vm):
    exec_services.vm_file_download_open(vm=running_vm, actor=owner, path="/etc/shadow")
    (row,) = _rows("vm.file_read")
    assert row.actor_id == owner.pk and row.after == {"path": "/etc/shadow", "size": 5, "sha256": "ab" * 32}


def test_exec_stdin_over_rest_is_audited_with_its_size_not_its_content(api, owner, running_vm):
    response = api.as_user(owner).post(
        f"/api/v1/vms/{running_vm.pk}/execs/e1/stdin/", {"data": "secret\n", "eof": True}, format="json"
    )
    assert response.status_code == 200, response.content
    (row,) = _rows("vm.exec_stdin")
    assert row.after == {"exec_id": "e1", "eof": True, "bytes": 7}
    assert "secret" not in json.dumps(row.after)


@pytest.mark.django_db(transaction=True)
async def test_exec_stdin_and_signals_over_the_websocket_service_are_audited(owner, monkeypatch):
    vm = await database_sync_to_async(VmFactory)(owner=owner, state="running")
    monkeypatch.setattr(exec_services, "_require_running", lambda vm: None)

    class Channel:
        async def call(self, vm_id, op, args, data, *, timeout):
            return {}, b""

    target = {"vm": vm, "actor": owner, "channel": Channel(), "exec_id": "e2"}
    await exec_services.vm_exec_stdin_async(**target, data=b"ls\n")
    await exec_services.vm_exec_signal_async(**target, signal="INT")
    rows = await database_sync_to_async(lambda: [(r.action, r.after) for r in AuditEvent.objects.order_by("id")])()
    assert ("vm.exec_stdin", {"exec_id": "e2", "eof": False, "bytes": 3}) in rows
    assert ("vm.exec_signal", {"exec_id": "e2", "signal": "INT"}) in rows


def test_the_request_id_is_generated_server_side(api, owner):
    api.as_user(owner)
    response = api.post("/api/v1/tokens/", {"name": "x"}, format="json", HTTP_X_REQUEST_ID="forged0000")
    assert response.status_code == 201
    assert response["X-Request-ID"] != "forged0000"
    assert response["X-Client-Request-ID"] == "forged0000"
    row = AuditEvent.objects.order_by("-id").first()
    assert row.request_id == response["X-Request-ID"] and row.client_request_id == "forged0000"


def test_a_client_request_id_cannot_collide_with_ours(api, owner, stranger):
    vm = VmFactory(owner=owner)
    api.as_user(stranger)
    first = api.post(f"/api/v1/vms/{vm.pk}/start/", format="json")  # 404, no row
    victim_id = first["X-Request-ID"]
    api.as_user(owner)
    response = api.patch(f"/api/v1/vms/{vm.pk}/", {"name": "renamed"}, format="json", HTTP_X_REQUEST_ID=victim_id)
    assert response.status_code == 200, response.content
    assert AuditEvent.objects.filter(action="vm.update", client_request_id=victim_id).exists()
    assert not AuditEvent.objects.filter(request_id=victim_id).exists()
