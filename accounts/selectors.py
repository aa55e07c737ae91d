from __future__ import annotations

from datetime import datetime

from django.conf import settings
from django.db.models import Q

from accounts.models import ApiToken, AuditEvent, Project, ProjectMembership, ProjectQuota, ProjectRole, UserQuota
from accounts.rights import request_cache
from accounts.roles import user_is_operator
from sandbox_site.validation import datetime_checked

QUOTA_FIELDS = ("max_vms", "max_vcpus", "max_memory_mib", "max_disk_gib")

# What each project role allows on the project's objects, by permission prefix
# (``vms.power_vm`` -> ``power``); a snapshot follows its VM's rights.
PROJECT_ROLE_PERMS: dict[str, frozenset[str] | None] = {
    ProjectRole.OWNER: None,  # every object permission
    ProjectRole.MEMBER: None,
    ProjectRole.VIEWER: frozenset({"view"}),
}
# Roles that may create objects in the project (and so count against its quota).
PROJECT_WRITE_ROLES = (ProjectRole.OWNER, ProjectRole.MEMBER)


def project_roles_of(user) -> dict:
    """``{project id: role}`` of ``user``'s memberships; read once per HTTP request
    (``accounts.rights.request_perm_cache``), fresh anywhere else."""
    if not getattr(user, "is_authenticated", False):
        return {}

    def read() -> dict:
        return dict(ProjectMembership.objects.filter(user=user).values_list("project_id", "role"))

    return request_cache(("project_roles", user.pk), read)


def project_role_of(user, project) -> str | None:
    return project_roles_of(user).get(getattr(project, "pk", project))


def project_role_effective(user, project_id) -> str | None:
    """``user``'s role in project ``project_id`` as it counts for rights: a user whose global
    role may not create VMs (a viewer) is at most a viewer in any project."""
    role = project_roles_of(user).get(project_id)
    if role not in (None, ProjectRole.VIEWER) and not user.has_perm("vms.add_vm"):
        return ProjectRole.VIEWER
    return role


# Rights a project role never gives: a private network's owner holds no delete right on it
# (operators made it for them; the owner's own grants still count).
PROJECT_ROLE_NEVER = frozenset({"networking.delete_network"})


def project_role_allows(role: str | None, perm: str) -> bool:
    """Whether a project ``role`` gives ``perm`` (``"app.<prefix>_<model>"``) on the project's objects."""
    if role is None or perm in PROJECT_ROLE_NEVER:
        return False
    allowed = PROJECT_ROLE_PERMS.get(role)
    if allowed is None:
        return True
    prefix = perm.split(".", 1)[-1].split("_", 1)[0]
    return prefix in allowed


def project_ids_with(user, perm: str) -> list:
    """Projects in which ``user``'s role gives ``perm`` on the objects."""
    return sorted(pk for pk in project_roles_of(user) if project_role_allows(project_role_effective(user, pk), perm))


def project_list_for(user):
    """Projects ``user`` is a member of (operators: all of them)."""
    from accounts.context import current_context

    qs = Project.objects.all()
    scope = current_context().token_project_id
    if scope is not None:
        qs = qs.filter(pk=scope)
    if user_is_operator(user):
        return qs
    return qs.filter(pk__in=ProjectMembership.objects.filter(user=user).values("project_id"))


def project_by_ref(ref) -> Project | None:
    """The project with this id or slug, or None (callers decide whether the user may see it)."""
    import uuid

    ref = str(ref or "").strip()
    if not ref or len(ref) > 63:
        return None
    try:
        return Project.objects.filter(pk=uuid.UUID(ref)).first()
    except ValueError:
        return Project.objects.filter(slug=ref).first()


def project_visible_to(user, project) -> bool:
    """Members see their projects, operators every project; a token limited to a project sees only it."""
    from accounts.context import current_context

    scope = current_context().token_project_id
    if scope is not None and project.pk != scope:
        return False
    return project.pk in project_roles_of(user) or user_is_operator(user)


def quota_of_user(user) -> dict[str, int]:
    """``user``'s own limits (over every VM they created, in any project)."""
    row = UserQuota.objects.filter(user=user).first()
    if row is None:
        return dict(settings.SANDBOX_DEFAULT_QUOTA)
    return {f: getattr(row, f) for f in QUOTA_FIELDS}


def quota_of_project(project) -> dict[str, int]:
    """``project``'s shared limits: its row, else its personal owner's user quota (a personal
    project), else SANDBOX_DEFAULT_PROJECT_QUOTA."""
    row = ProjectQuota.objects.filter(project=project).first()
    if row is not None:
        return {f: getattr(row, f) for f in QUOTA_FIELDS}
    if project.personal_of_id is not None:
        return quota_of_user(project.personal_of)
    return dict(settings.SANDBOX_DEFAULT_PROJECT_QUOTA)


def token_list_for(user):
    return ApiToken.objects.filter(user=user)


def audit_events_visible(user):
    """Operators and admins see everything; users see events about their own objects and
    their own actions."""
    qs = AuditEvent.objects.all()
    if user_is_operator(user):
        return qs
    return qs.filter(Q(object_owner_id=user.pk) | Q(actor_id=user.pk))


def audit_oldest_unsealed_at() -> datetime | None:
    """When the oldest audit row not yet sealed into the chain was written (None: none is)."""
    return AuditEvent.objects.filter(chain_seq__isnull=True).order_by("id").values_list("created_at", flat=True).first()


def _parse_time(value: str, name: str) -> datetime:
    return datetime_checked(value, name)


def audit_events_filter(qs, params):
    if params.get("actor"):
        qs = qs.filter(actor_username=params["actor"])
    if params.get("action"):
        action = params["action"]
        qs = qs.filter(action__startswith=action[:-1]) if action.endswith("*") else qs.filter(action=action)
    if params.get("object_type"):
        qs = qs.filter(object_type=params["object_type"])
    if params.get("object_id"):
        qs = qs.filter(object_id=params["object_id"])
    if params.get("result"):
        qs = qs.filter(result=params["result"])
    if params.get("request_id"):
        qs = qs.filter(request_id=params["request_id"])
    if params.get("since"):
        qs = qs.filter(created_at__gte=_parse_time(params["since"], "since"))
    if params.get("until"):
        qs = qs.filter(created_at__lt=_parse_time(params["until"], "until"))
    return qs
