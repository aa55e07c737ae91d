"""/api/v1/projects/: membership, shared quota and usage, the project of a create, and API
tokens limited to one project."""

from __future__ import annotations

import pytest

from accounts import services
from accounts.models import AuditEvent, ProjectMembership, ProjectRole
from tests.factories import TemplateFactory, VmFactory
from vms.models import VM

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _quiet(settings):
    settings.SANDBOX_NETWORKING = False
    settings.CELERY_TASK_ALWAYS_EAGER = False


@pytest.fixture
def team(owner, grantee, viewer):
    project = services.project_create(name="Team", slug="team", actor=owner)
    services.project_member_set(project=project, user=grantee, role=ProjectRole.MEMBER, actor=owner)
    services.project_member_set(project=project, user=viewer, role=ProjectRole.VIEWER, actor=owner)
    return project


def _slugs(response):
    return {row["slug"] for row in response.json()["results"]}


def test_it_lists_my_projects_only(api, team, owner, stranger, operator):
    assert _slugs(api.as_user(owner).get("/api/v1/projects/")) == {"team", owner.personal_project.slug}
    assert _slugs(api.as_user(stranger).get("/api/v1/projects/")) == {stranger.personal_project.slug}
    assert "team" in _slugs(api.as_user(operator).get("/api/v1/projects/"))
    assert api.as_user(stranger).get(f"/api/v1/projects/{team.pk}/").status_code == 404


def test_it_creates_a_project_owned_by_its_creator(api, grantee):
    response = api.as_user(grantee).post("/api/v1/projects/", {"name": "Lab", "slug": "lab"}, format="json")
    assert response.status_code == 201, response.content
    assert response.json()["members"] == [
        {"username": "grantee", "role": "owner", "created_at": response.json()["members"][0]["created_at"]}
    ]
    assert AuditEvent.objects.filter(action="project.create", actor=grantee).exists()
    reserved = api.as_user(grantee).post("/api/v1/projects/", {"name": "X", "slug": "personal-1"}, format="json")
    assert reserved.status_code == 400


def test_project_owners_manage_members(api, team, owner, grantee, stranger):
    url = f"/api/v1/projects/{team.pk}/members/"
    refused = api.as_user(grantee).post(url, {"username": "stranger", "role": "member"}, format="json")
    assert refused.status_code == 403
    response = api.as_user(owner).post(url, {"username": "stranger", "role": "viewer"}, format="json")
    assert response.status_code == 200, response.content
    assert ProjectMembership.objects.get(project=team, user=stranger).role == "viewer"
    assert api.as_user(owner).delete(f"{url}stranger/").status_code == 204
    assert not ProjectMembership.objects.filter(project=team, user=stranger).exists()
    assert AuditEvent.objects.filter(action="project.member_remove", result="ok").exists()


def test_members_see_usage_and_only_operators_set_the_quota(api, team, owner, viewer, stranger, operator):
    VmFactory(owner=owner, project=team, vcpus=2)
    usage = api.as_user(viewer).get(f"/api/v1/projects/{team.pk}/usage/")
    assert usage.status_code == 200
    assert usage.json()["usage"]["vms"] == 1 and usage.json()["usage"]["vcpus"] == 2
    assert api.as_user(stranger).get(f"/api/v1/projects/{team.pk}/usage/").status_code == 404
    url = f"/api/v1/projects/{team.pk}/quota/"
    assert api.as_user(owner).patch(url, {"max_vms": 50}, format="json").status_code == 403
    response = api.as_user(operator).patch(url, {"max_vms": 2}, format="json")
    assert response.status_code == 200 and response.json()["max_vms"] == 2
    assert api.as_user(viewer).get(url).json()["max_vms"] == 2
    assert api.as_user(operator).patch(url, {"max_vms": -1}, format="json").status_code == 400
    assert AuditEvent.objects.filter(action="quota.update", result="denied", actor=owner).exists()


def test_operators_set_a_users_quota(api, owner, operator):
    url = f"/api/v1/users/{owner.pk}/quota/"
    assert api.as_user(owner).get(url).status_code == 200
    assert api.as_user(owner).patch(url, {"max_vms": 99}, format="json").status_code == 403
    response = api.as_user(operator).patch(url, {"max_vcpus": 3}, format="json")
    assert response.status_code == 200 and response.json()["max_vcpus"] == 3
    assert api.as_user(owner).get(url).json()["max_vcpus"] == 3


def test_a_create_takes_its_project_from_the_parameter(api, team, grantee, viewer, stranger):
    TemplateFactory()
    body = {"name": "in-team", "template": "test-template", "start": False, "project": "team"}
    response = api.as_user(grantee).post("/api/v1/vms/", body, format="json")
    assert response.status_code == 202, response.content
    assert response.json()["project"] == "team"
    assert VM.objects.get(name="in-team").project == team
    assert api.as_user(viewer).post("/api/v1/vms/", {**body, "name": "v"}, format="json").status_code == 403
    assert api.as_user(stranger).post("/api/v1/vms/", {**body, "name": "s"}, format="json").status_code == 404
    null = api.as_user(grantee).post("/api/v1/vms/", {**body, "name": "mine", "project": None}, format="json")
    assert null.status_code == 400  # null is not a project
    body.pop("project")
    mine = api.as_user(grantee).post("/api/v1/vms/", {**body, "name": "mine"}, format="json")
    assert mine.json()["project"] == grantee.personal_project.slug


def test_a_token_limited_to_a_project_sees_and_acts_only_within_it(api, team, grantee):
    TemplateFactory()
    personal_vm = VmFactory(owner=grantee, name="personal")
    team_vm = VmFactory(owner=grantee, name="teamvm", project=team)
    response = api.as_user(grantee).post("/api/v1/tokens/", {"name": "ci", "project": "team"}, format="json")
    assert response.status_code == 201, response.content
    assert response.json()["project"] == "team"
    api.logout()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {response.json()['token']}")

    assert {row["name"] for row in api.get("/api/v1/vms/").json()["results"]} == {"teamvm"}
    assert api.get(f"/api/v1/vms/{personal_vm.pk}/").status_code == 404
    assert api.post(f"/api/v1/vms/{personal_vm.pk}/stop/", {}, format="json").status_code == 404
    assert api.get(f"/api/v1/vms/{team_vm.pk}/").status_code == 200
    assert _slugs(api.get("/api/v1/projects/")) == {"team"}
    created = api.post("/api/v1/vms/", {"name": "by-token", "template": "test-template", "start": False}, format="json")
    assert created.status_code == 202 and created.json()["project"] == "team"
    elsewhere = {"name": "x", "template": "test-template", "start": False, "project": grantee.personal_project.slug}
    assert api.post("/api/v1/vms/", elsewhere, format="json").status_code == 404


def test_a_token_is_limited_only_to_a_project_of_its_user(api, team, stranger):
    response = api.as_user(stranger).post("/api/v1/tokens/", {"name": "ci", "project": "team"}, format="json")
    assert response.status_code == 404


def test_an_open_websocket_of_a_limited_token_holds_only_vms_of_its_project(team, grantee):
    from accounts.rights import websocket_rights_hold

    token, _ = services.token_create(user=grantee, name="ws", project=team, actor=grantee)
    inside = VmFactory(owner=grantee, name="inside", project=team)
    outside = VmFactory(owner=grantee, name="outside")
    assert websocket_rights_hold(user_id=grantee.pk, token_id=token.pk, vm_id=inside.pk, perm="view")
    assert not websocket_rights_hold(user_id=grantee.pk, token_id=token.pk, vm_id=outside.pk, perm="view")


def test_removing_a_member_takes_their_rights_on_the_projects_vms(api, team, owner, grantee):
    vm = VmFactory(owner=owner, name="shared-by-project", project=team)
    assert api.as_user(grantee).get(f"/api/v1/vms/{vm.pk}/").status_code == 200
    services.project_member_remove(project=team, user=grantee, actor=owner)
    assert api.as_user(grantee).get(f"/api/v1/vms/{vm.pk}/").status_code == 404


def test_a_single_vm_shared_across_projects_keeps_working(api, team, owner, stranger):
    from guardian.shortcuts import assign_perm

    vm = VmFactory(owner=owner, name="one-shared", project=team)
    assign_perm("vms.view_vm", stranger, vm)
    assert api.as_user(stranger).get(f"/api/v1/vms/{vm.pk}/").status_code == 200
    assert api.as_user(stranger).post(f"/api/v1/vms/{vm.pk}/start/", {}, format="json").status_code == 403


def test_a_members_rights_on_vms_they_created_follow_their_project_role(api, team, owner, grantee):
    TemplateFactory()
    body = {"name": "mine-in-team", "template": "test-template", "start": False, "project": "team"}
    vm_id = api.as_user(grantee).post("/api/v1/vms/", body, format="json").json()["id"]
    services.project_member_set(project=team, user=grantee, role=ProjectRole.VIEWER, actor=owner)
    client = api.as_user(grantee)
    assert client.get(f"/api/v1/vms/{vm_id}/").status_code == 200
    assert client.post(f"/api/v1/vms/{vm_id}/start/", {}, format="json").status_code == 403
    services.project_member_remove(project=team, user=grantee, actor=owner)
    assert client.get(f"/api/v1/vms/{vm_id}/").status_code == 404
    assert api.as_user(owner).get(f"/api/v1/vms/{vm_id}/").status_code == 200  # the project keeps it


def test_a_limited_token_lists_only_its_projects_operations(api, team, grantee):
    from vms.models import Operation

    inside = VmFactory(owner=grantee, name="op-inside", project=team)
    outside = VmFactory(owner=grantee, name="op-outside")
    for vm in (inside, outside):
        Operation.objects.create(vm=vm, vm_ref=vm.pk, action="start", requested_by=grantee, vm_owner_id=grantee.pk)
    response = api.as_user(grantee).post("/api/v1/tokens/", {"name": "ci", "project": "team"}, format="json")
    api.logout()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {response.json()['token']}")
    listed = api.get("/api/v1/operations/").json()["results"]
    assert {row["vm"] for row in listed} == {str(inside.pk)}


def test_a_removed_member_no_longer_sees_the_snapshots_of_their_team_vms(api, team, owner, grantee):
    from tests.factories import SnapshotFactory

    snapshot = SnapshotFactory(vm=VmFactory(owner=grantee, name="snapped", project=team))
    client = api.as_user(grantee)
    assert {row["id"] for row in client.get("/api/v1/snapshots/").json()["results"]} == {str(snapshot.pk)}
    services.project_member_remove(project=team, user=grantee, actor=owner)
    from guardian.models import UserObjectPermission

    UserObjectPermission.objects.filter(user=grantee).delete()  # the factory granted the creator rights
    assert client.get("/api/v1/snapshots/").json()["results"] == []
    assert client.get(f"/api/v1/snapshots/{snapshot.pk}/").status_code == 404


def test_a_project_limited_to_some_templates_creates_only_from_them(api, owner, settings):
    from accounts.services import project_create
    from sandbox_site.errors import ApplicationError
    from tests.factories import TemplateFactory
    from vms import services as vm_services
    from vms.models import VM

    settings.SANDBOX_NETWORKING = False
    team = project_create(name="Team", slug="tmpl-team", actor=owner)
    allowed, other = TemplateFactory(name="allowed-tmpl"), TemplateFactory(name="other-tmpl")
    vm, _ = vm_services.vm_create(owner=owner, name="any", template=other, project=team, start=False, actor=owner)
    assert vm.project == team  # no templates named: every active one
    team.templates.set([allowed])
    with pytest.raises(ApplicationError) as err:
        vm_services.vm_create(owner=owner, name="refused", template=other, project=team, start=False, actor=owner)
    assert err.value.details == {"template": "not allowed in this project"}
    assert not VM.objects.filter(name="refused").exists()
    vm_services.vm_create(owner=owner, name="fine", template=allowed, project=team, start=False, actor=owner)
    api.as_user(owner)
    names = [t["name"] for t in api.get(f"/api/v1/templates/?project={team.slug}").json()["results"]]
    assert names == ["allowed-tmpl"]
    assert api.get(f"/api/v1/projects/{team.pk}/").json()["templates"] == ["allowed-tmpl"]
    everything = [t["name"] for t in api.get("/api/v1/templates/").json()["results"]]
    assert {"allowed-tmpl", "other-tmpl"} <= set(everything)
    assert api.get("/api/v1/templates/?project=not-mine").json()["results"] == []
