"""The same permission matrix against every VM endpoint, for three personas:
the owner (all rights), a grantee holding chosen rights (view + power) and a stranger (none).
Invisible -> 404, visible but not allowed -> 403 (+ a denied audit row), allowed -> 2xx
(+ an audit row for each write)."""

import pytest
from guardian.shortcuts import assign_perm

from accounts.models import AuditEvent
from vms.models import VM, Operation

# (name, method, path suffix, body, state the VM must be in, permission needed, audit action)
ENDPOINTS = [
    ("retrieve", "get", "", None, "stopped", "view", None),
    ("operations", "get", "operations/", None, "stopped", "view", None),
    ("permissions", "get", "permissions/", None, "stopped", "view", None),
    ("samples", "get", "samples/", None, "running", "view", None),
    ("console-ticket", "post", "console-ticket/", {}, "running", "view", "console.ticket"),
    ("rename", "patch", "", {"name": "renamed"}, "stopped", "change", "vm.update"),
    ("resize", "patch", "", {"vcpus": 2}, "stopped", "change", "vm.resize"),
    ("start", "post", "start/", {}, "stopped", "power", "vm.start"),
    ("stop", "post", "stop/", {}, "running", "power", "vm.stop"),
    ("reboot", "post", "reboot/", {}, "running", "power", "vm.reboot"),
    ("pause", "post", "pause/", {}, "running", "power", "vm.pause"),
    ("resume", "post", "resume/", {}, "paused", "power", "vm.resume"),
    (
        "grant",
        "post",
        "permissions/",
        {"user": "other", "permissions": ["view_vm"]},
        "stopped",
        "change",
        "permission.grant",
    ),
    ("revoke", "delete", "permissions/", {"user": "other"}, "stopped", "change", "permission.revoke"),
    ("delete", "delete", "", None, "stopped", "delete", "vm.delete"),
]

GRANTEE_PERMS = {"view", "power"}


@pytest.fixture
def other(db):
    from tests.factories import UserFactory

    return UserFactory(username="other")


@pytest.fixture
def shared_vm(vm, grantee, other):
    for perm in GRANTEE_PERMS:
        assign_perm(f"vms.{perm}_vm", grantee, vm)
    return vm


def _call(api, method, vm, suffix, body):
    return getattr(api, method)(f"/api/v1/vms/{vm.pk}/{suffix}", body, format="json")


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=[e[0] for e in ENDPOINTS])
@pytest.mark.parametrize("persona", ["owner", "grantee", "stranger"])
def test_it_enforces_object_permissions(request, api, shared_vm, persona, endpoint):
    name, method, suffix, body, state, perm, audit_action = endpoint
    VM.objects.filter(pk=shared_vm.pk).update(state=state)
    user = request.getfixturevalue(persona)
    before_ids = set(AuditEvent.objects.values_list("id", flat=True))

    response = _call(api.as_user(user), method, shared_vm, suffix, body)

    new_events = AuditEvent.objects.exclude(id__in=before_ids).exclude(action__startswith="auth.")
    if persona == "stranger":
        assert response.status_code == 404, response.content
        assert response.json()["error"]["code"] == "not_found"
        assert not new_events.exists()
        return
    allowed = persona == "owner" or perm in GRANTEE_PERMS
    if not allowed:
        assert response.status_code == 403, response.content
        assert response.json()["error"]["code"] == "permission_denied"
        assert new_events.filter(result="denied", object_id=str(shared_vm.pk)).exists()
        assert VM.objects.filter(pk=shared_vm.pk, state=state).exists()
        return
    assert 200 <= response.status_code < 300, response.content
    if audit_action:
        event = new_events.get(action=audit_action, result="ok")
        assert event.actor_id == user.pk
        assert event.object_id == str(shared_vm.pk)


def test_it_lists_only_permitted_vms(api, owner, grantee, stranger, shared_vm):
    from tests.factories import VmFactory

    VmFactory(owner=stranger, name="strangers-vm")
    assert [v["name"] for v in api.as_user(owner).get("/api/v1/vms/").json()["results"]] == ["owned-vm"]
    assert [v["name"] for v in api.as_user(grantee).get("/api/v1/vms/").json()["results"]] == ["owned-vm"]
    assert [v["name"] for v in api.as_user(stranger).get("/api/v1/vms/").json()["results"]] == ["strangers-vm"]


def test_it_lets_operators_see_and_act_on_every_vm(api, operator, vm):
    assert api.as_user(operator).get(f"/api/v1/vms/{vm.pk}/").status_code == 200
    assert api.as_user(operator).post(f"/api/v1/vms/{vm.pk}/start/", {}, format="json").status_code == 202


def test_it_hides_malformed_ids(api, owner):
    assert api.as_user(owner).get("/api/v1/vms/not-a-uuid/").status_code == 404


def test_it_refuses_creation_to_viewers(api, viewer):
    from tests.factories import TemplateFactory

    TemplateFactory()
    response = api.as_user(viewer).post("/api/v1/vms/", {"name": "x", "template": "test-template"}, format="json")
    assert response.status_code == 403
    assert not VM.objects.exists()


def test_it_creates_a_vm_with_owner_rights_and_an_operation(api, owner, django_capture_on_commit_callbacks):
    from tests.factories import TemplateFactory

    TemplateFactory()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = api.as_user(owner).post(
            "/api/v1/vms/", {"name": "web-1", "template": "test-template", "start": False}, format="json"
        )
    assert response.status_code == 202, response.content
    vm = VM.objects.get(pk=response.json()["id"])
    assert vm.state == "creating"
    assert owner.has_perm("vms.exec_vm", vm)
    assert Operation.objects.get(pk=response.json()["operation"]).action == "create"
    assert AuditEvent.objects.filter(action="vm.create", object_id=str(vm.pk), actor_id=owner.pk).exists()
    assert len(callbacks) >= 1  # the task is enqueued only after commit


def test_it_checks_template_limits_and_quota(api, owner, settings):
    from tests.factories import TemplateFactory

    TemplateFactory()
    too_big = api.as_user(owner).post(
        "/api/v1/vms/", {"name": "big", "template": "test-template", "vcpus": 9}, format="json"
    )
    assert too_big.status_code == 400
    assert "vcpus" in too_big.json()["error"]["details"]
    settings.SANDBOX_DEFAULT_QUOTA = {**settings.SANDBOX_DEFAULT_QUOTA, "max_vms": 0}
    over = api.as_user(owner).post("/api/v1/vms/", {"name": "one", "template": "test-template"}, format="json")
    assert over.status_code == 403
    assert over.json()["error"]["code"] == "quota_exceeded"
    assert not VM.objects.exists()


def test_it_refuses_a_transition_from_the_wrong_state(api, owner, vm):
    response = api.as_user(owner).post(f"/api/v1/vms/{vm.pk}/pause/", {}, format="json")
    assert response.status_code == 409
    assert response.json()["error"]["details"]["state"] == "stopped"


def test_it_only_shares_rights_the_sharer_holds(api, grantee, other, shared_vm):
    assign_perm("vms.change_vm", grantee, shared_vm)
    response = api.as_user(grantee).post(
        f"/api/v1/vms/{shared_vm.pk}/permissions/", {"user": "other", "permissions": ["exec_vm"]}, format="json"
    )
    assert response.status_code == 403
    assert not other.has_perm("vms.exec_vm", shared_vm)


def test_it_lets_a_grantee_use_exactly_the_shared_rights(api, owner, other, vm):
    response = api.as_user(owner).post(
        f"/api/v1/vms/{vm.pk}/permissions/", {"user": "other", "permissions": ["view_vm"]}, format="json"
    )
    assert response.status_code == 200
    assert api.as_user(other).get(f"/api/v1/vms/{vm.pk}/").status_code == 200
    assert api.as_user(other).post(f"/api/v1/vms/{vm.pk}/start/", {}, format="json").status_code == 403
