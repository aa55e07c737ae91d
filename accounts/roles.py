"""Roles as Django groups, with the global permissions each one carries.

- admin: superuser; everything, including users and roles.
- operator: staff; sees and acts on every VM (global VM permissions), manages templates,
  images, hosts, networks and quotas in the admin, reads the whole audit log.
- user: creates VMs and acts on their own and on what is shared with them.
- viewer: read-only; sees only what is shared with them, cannot create.
Object permissions (per VM) come on top, through django-guardian.
"""

from __future__ import annotations

from django.contrib.auth.models import Group, Permission

from accounts.models import Role
from accounts.rights import request_user_standing

VM_OBJECT_PERMS = ("view_vm", "change_vm", "delete_vm", "power_vm", "console_vm", "exec_vm", "snapshot_vm")

# app_label.codename for each role's global permissions.
ROLE_GLOBAL_PERMS: dict[str, tuple[str, ...]] = {
    Role.ADMIN: (),  # superuser
    Role.OPERATOR: (
        *(f"vms.{p}" for p in VM_OBJECT_PERMS),
        "vms.add_vm",
        "vms.add_template",
        "vms.change_template",
        "vms.delete_template",
        "vms.view_template",
        *(f"vms.{p}_image" for p in ("add", "change", "delete", "view")),
        "vms.view_operation",
        "vms.view_host",
        "vms.change_host",
        "vms.delete_host",
        "accounts.view_auditevent",
        "accounts.add_userquota",
        "accounts.change_userquota",
        "accounts.view_userquota",
        "accounts.view_loginthrottle",
        "accounts.change_loginthrottle",
        "accounts.delete_loginthrottle",
        "auth.view_user",
        *(f"networking.{p}_network" for p in ("add", "change", "delete", "view", "use")),
    ),
    Role.USER: ("vms.add_vm", "vms.view_template"),
    Role.VIEWER: ("vms.view_template",),
}

STAFF_ROLES = {Role.ADMIN, Role.OPERATOR}


def roles_sync() -> None:
    """Create the role groups and give them their global permissions (idempotent)."""
    for role, perms in ROLE_GLOBAL_PERMS.items():
        group, _ = Group.objects.get_or_create(name=role)
        wanted = []
        for dotted in perms:
            app_label, codename = dotted.split(".", 1)
            perm = Permission.objects.filter(content_type__app_label=app_label, codename=codename).first()
            if perm is not None:
                wanted.append(perm)
        group.permissions.set(wanted)


def user_role(user) -> str | None:
    if user.is_superuser:
        return Role.ADMIN
    if (
        "groups" not in getattr(user, "_prefetched_objects_cache", {})
        and (standing := request_user_standing(user)) is not None
    ):
        names = standing.group_names  # read once per request, with its rights
    else:
        names = {group.name for group in user.groups.all()}  # lists prefetch ``groups``
    for role in (Role.ADMIN, Role.OPERATOR, Role.USER, Role.VIEWER):
        if role in names:
            return role
    return None


def user_is_operator(user) -> bool:
    return bool(user.is_authenticated and (user.is_superuser or user_role(user) in STAFF_ROLES))
