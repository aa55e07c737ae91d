"""``accounts.rights.user_rights_read`` (plain SQL, one query) answers what guardian, the auth
backend and the project memberships answer one by one: for a user's own and its groups' rights
on an object, its role's global rights, and its projects; nothing of another object, user or
content type leaks in."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group
from django.db import connection
from django.test.utils import CaptureQueriesContext
from guardian.shortcuts import assign_perm, get_perms

from accounts.models import Project, ProjectMembership, ProjectRole
from accounts.rights import user_rights_read
from tests.factories import UserFactory, VmFactory

pytestmark = pytest.mark.django_db


def test_one_query_gives_object_rights_global_rights_and_project_roles(owner):
    user, other = UserFactory(username="reader"), UserFactory(username="other")
    vm, vm2 = VmFactory(owner=owner), VmFactory(owner=owner)
    team = Group.objects.create(name="readers-team")
    user.groups.add(team)
    assign_perm("vms.view_vm", user, vm)  # its own
    assign_perm("vms.exec_vm", team, vm)  # through its group
    assign_perm("vms.power_vm", user, vm2)  # another VM: not this one's
    assign_perm("vms.delete_vm", other, vm)  # another user: not this one's
    project = Project.objects.create(name="Readers", slug="readers")
    ProjectMembership.objects.create(project=project, user=user, role=ProjectRole.VIEWER)
    user = type(user).objects.get(pk=user.pk)  # no cached rights

    with CaptureQueriesContext(connection) as queries:
        rights = user_rights_read(user, vm, with_global=True, with_roles=True)
    assert len(queries) == 1

    assert rights.object_perms == sorted(get_perms(user, vm)) == ["exec_vm", "view_vm"]
    assert rights.global_perms == type(user).objects.get(pk=user.pk).get_all_permissions()
    assert rights.project_roles == dict(ProjectMembership.objects.filter(user=user).values_list("project_id", "role"))
    assert project.pk in rights.project_roles and len(rights.project_roles) >= 2  # and its personal project

    only_object = user_rights_read(user, vm2, with_global=False)
    assert only_object.object_perms == ["power_vm"]
    assert only_object.global_perms is None and only_object.project_roles is None
    assert user_rights_read(UserFactory(username="nobody"), vm, with_global=False).object_perms == []


def test_a_request_reads_a_users_global_rights_groups_and_projects_in_one_query(owner):
    """``request_user_standing``: within a request, the global rights, the role and the project
    roles the list endpoints ask for come from one query, with the answers of the reads they
    replace; a change of rights (``rights_changed``) makes the next call read again, and
    outside a request nothing is kept."""
    from accounts.models import Role
    from accounts.rights import request_perm_cache, request_user_standing, rights_changed
    from accounts.roles import user_role
    from accounts.selectors import project_roles_of
    from accounts.services import user_set_role

    user = UserFactory(username="standing", role=Role.USER)
    team = Group.objects.create(name="standing-team")
    user.groups.add(team)
    assign_perm("vms.view_template", team)
    assign_perm("accounts.view_auditevent", user)
    project = Project.objects.create(name="Standing", slug="standing")
    ProjectMembership.objects.create(project=project, user=user, role=ProjectRole.MEMBER)
    fresh = type(user).objects.get(pk=user.pk)
    roles = dict(ProjectMembership.objects.filter(user=user).values_list("project_id", "role"))
    assert roles[project.pk] == ProjectRole.MEMBER
    expected = (fresh.get_all_permissions(), set(fresh.groups.values_list("name", flat=True)), roles)

    assert request_user_standing(user) is None  # outside a request
    with request_perm_cache():
        user = type(user).objects.get(pk=user.pk)
        with CaptureQueriesContext(connection) as queries:
            assert user_role(user) == Role.USER
            assert user.get_all_permissions() == expected[0]
            assert set(request_user_standing(user).group_names) == expected[1]
            assert project_roles_of(user) == expected[2]
            assert user.has_perm("accounts.view_auditevent") and not user.has_perm("vms.add_template")
        assert len(queries) == 1, [q["sql"] for q in queries.captured_queries]
        user_set_role(user=user, role=Role.OPERATOR, actor=None)  # calls rights_changed: read again
        assert user_role(type(user).objects.get(pk=user.pk)) == Role.OPERATOR
        rights_changed([user.pk])
        assert user_role(user) == Role.OPERATOR
