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
