"""Projects: personal projects, membership, quotas shared by members, and the migration that
put every existing object into its owner's personal project."""

from __future__ import annotations

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from accounts import selectors, services
from accounts.models import AuditEvent, Project, ProjectMembership, ProjectRole
from sandbox_site.errors import ApplicationError, ConflictError, NotPermitted, QuotaExceeded
from tests.factories import SnapshotFactory, TemplateFactory, UserFactory, VmFactory
from vms import services as vm_services

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _no_networking(settings):
    settings.SANDBOX_NETWORKING = False
    settings.CELERY_TASK_ALWAYS_EAGER = False


@pytest.fixture
def team(owner, grantee, viewer):
    project = services.project_create(name="Team", slug="team", actor=owner)
    services.project_member_set(project=project, user=grantee, role=ProjectRole.MEMBER, actor=owner)
    services.project_member_set(project=project, user=viewer, role=ProjectRole.VIEWER, actor=owner)
    return project


def test_it_gives_every_new_user_a_personal_project(db):
    user = UserFactory()
    project = user.personal_project
    assert project.slug == f"personal-{user.pk}"
    assert ProjectMembership.objects.get(project=project).user == user
    assert selectors.project_role_of(user, project) == ProjectRole.OWNER


def test_it_puts_vms_and_snapshots_into_the_owners_personal_project(owner):
    vm = VmFactory(owner=owner)
    snapshot = SnapshotFactory(vm=vm)
    assert vm.project == owner.personal_project == snapshot.project


def test_it_creates_a_vm_in_a_team_project_for_a_member(team, grantee):
    vm, _ = vm_services.vm_create(owner=grantee, name="t1", template=TemplateFactory(), project=team, actor=grantee)
    assert vm.project == team and vm.owner == grantee


def test_it_refuses_a_create_by_a_project_viewer_and_a_stranger(team, viewer, stranger):
    template = TemplateFactory()
    with pytest.raises(NotPermitted):
        vm_services.vm_create(owner=viewer, name="v1", template=template, project=team, actor=viewer)
    with pytest.raises(ApplicationError) as exc:
        vm_services.vm_create(owner=stranger, name="s1", template=template, project=team, actor=stranger)
    assert exc.value.status_code == 404


def test_it_counts_every_members_vms_against_the_project_quota(team, owner, grantee):
    services.quota_project_set(project=team, values={"max_vms": 1}, actor=UserFactory(role="operator"))
    template = TemplateFactory()
    vm_services.vm_create(owner=owner, name="a", template=template, project=team, actor=owner)
    with pytest.raises(QuotaExceeded) as exc:
        vm_services.vm_create(owner=grantee, name="b", template=template, project=team, actor=grantee)
    assert "project" in exc.value.message
    # The member's personal project has its own budget.
    vm_services.vm_create(owner=grantee, name="b", template=template, actor=grantee)


def test_it_keeps_the_users_own_quota_in_a_team_project(team, grantee, operator):
    services.quota_user_set(user=grantee, values={"max_vms": 0}, actor=operator)
    with pytest.raises(QuotaExceeded):
        vm_services.vm_create(owner=grantee, name="c", template=TemplateFactory(), project=team, actor=grantee)


def test_it_lets_only_project_owners_change_members(team, grantee, stranger):
    with pytest.raises(NotPermitted):
        services.project_member_set(project=team, user=stranger, role=ProjectRole.MEMBER, actor=grantee)
    assert AuditEvent.objects.filter(action="project.member_set", result="denied").exists()
    assert not ProjectMembership.objects.filter(project=team, user=stranger).exists()


def test_it_keeps_one_owner(team, owner):
    with pytest.raises(ConflictError):
        services.project_member_set(project=team, user=owner, role=ProjectRole.MEMBER, actor=owner)
    with pytest.raises(ConflictError):
        services.project_member_remove(project=team, user=owner, actor=owner)


def test_it_has_no_other_members_in_a_personal_project(owner, grantee):
    with pytest.raises(ConflictError):
        services.project_member_set(project=owner.personal_project, user=grantee, role=ProjectRole.MEMBER, actor=owner)


def test_it_lets_only_operators_set_quotas_and_audits_it(team, owner, operator):
    with pytest.raises(NotPermitted):
        services.quota_project_set(project=team, values={"max_vms": 99}, actor=owner)
    with pytest.raises(ApplicationError):
        services.quota_project_set(project=team, values={"max_vms": -1}, actor=operator)
    quota = services.quota_project_set(project=team, values={"max_vms": 7}, actor=operator)
    assert quota["max_vms"] == 7 == selectors.quota_of_project(team)["max_vms"]
    event = AuditEvent.objects.get(action="quota.update", result="ok")
    assert event.after["max_vms"] == 7 and event.before["max_vms"] != 7


def test_a_personal_project_has_its_users_quota_by_default(owner, operator):
    services.quota_user_set(user=owner, values={"max_vcpus": 3}, actor=operator)
    assert selectors.quota_of_project(owner.personal_project)["max_vcpus"] == 3


@pytest.mark.django_db(transaction=True)
def test_the_migration_puts_every_existing_object_into_its_owners_personal_project():
    if connection.vendor != "postgresql":
        pytest.skip("migrates the PostgreSQL test database back and forth")
    before = [
        ("accounts", "0003_audit_seal_order"),
        ("vms", "0009_golden_snapshot_and_pool"),
        ("snapshots", "0003_golden_snapshots"),
        ("networking", "0002_egress_widened"),
    ]
    executor = MigrationExecutor(connection)
    latest = executor.loader.graph.leaf_nodes()
    executor.migrate(before)
    try:
        old = executor.loader.project_state(before).apps
        User = old.get_model("auth", "User")
        alice, bob = User.objects.create(username="alice"), User.objects.create(username="bob")
        image = old.get_model("vms", "Image").objects.create(name="old-image")
        template = old.get_model("vms", "Template").objects.create(name="old-template", image=image)
        host = old.get_model("vms", "Host").objects.create(name="old-host")
        VM = old.get_model("vms", "VM")
        vms = [
            VM.objects.create(
                name=f"vm{i}", owner=user, template=template, host=host, vcpus=1, memory_mib=128, disk_gib=1
            )
            for i, user in enumerate((alice, bob, alice))
        ]
        old.get_model("snapshots", "Snapshot").objects.create(
            vm=vms[1], vm_ref=vms[1].pk, owner=bob, host=host, template=template, name="s", vcpus=1, memory_mib=128,
            disk_gib=1,
        )  # fmt: skip
        old.get_model("networking", "Network").objects.create(
            name="bobs", owner=bob, cidr="10.99.0.0/24", gateway="10.99.0.1"
        )
        executor = MigrationExecutor(connection)
        executor.migrate(latest)
        from networking.models import Network
        from snapshots.models import Snapshot
        from vms.models import VM as NewVM

        personal = {
            p.personal_of.username: p for p in Project.objects.filter(personal_of__username__in=["alice", "bob"])
        }
        assert set(personal) == {"alice", "bob"}
        assert {(vm.name, vm.project_id) for vm in NewVM.objects.filter(host__name="old-host")} == {
            ("vm0", personal["alice"].pk),
            ("vm1", personal["bob"].pk),
            ("vm2", personal["alice"].pk),
        }
        assert Snapshot.objects.get(name="s").project == personal["bob"]
        assert Network.objects.get(name="bobs").project == personal["bob"]
        assert ProjectMembership.objects.get(project=personal["alice"]).role == ProjectRole.OWNER
    finally:
        MigrationExecutor(connection).migrate(latest)
