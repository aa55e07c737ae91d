"""Rights of open websockets, re-checked when they change.

A console, exec or events websocket holds rights checked at connect time. When something that
grants them changes (a token revoked, a share removed, a user deactivated or given another
role, an admin-site edit of users, tokens or permissions), the service that changed it calls
``rights_changed`` for the users concerned: after commit, one small event goes to each user's
group ``accounts.rights.<user id>``, and every connection of that user re-checks at once
(``websocket_rights_hold``) and closes (4403) when its right is gone. Connections also
re-check every SANDBOX_WS_RECHECK_SECONDS, so a lost event (channel layer down, a change made
outside the services) closes them within that time.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from django.db import transaction


def rights_group(user_id) -> str:
    return f"accounts.rights.{user_id}"


# Object permissions read during one HTTP request, per user (``accounts.services.user_has_perm``):
# set by ``request_perm_cache`` around each request, emptied whenever rights change.
_request_checkers: contextvars.ContextVar[dict | None] = contextvars.ContextVar("request_perm_checkers", default=None)


@contextlib.contextmanager
def request_perm_cache() -> Iterator[None]:
    """Object permission lookups within the block are kept (one request: RequestContextMiddleware)."""
    token = _request_checkers.set({})
    try:
        yield
    finally:
        _request_checkers.reset(token)


def request_cache_has(key) -> bool:
    checkers = _request_checkers.get()
    return checkers is not None and key in checkers


def request_cache(key, read):
    """``read()``, kept for the rest of the HTTP request under ``key`` (emptied with the
    checkers when rights change); outside a request, always fresh."""
    checkers = _request_checkers.get()
    if checkers is None:
        return read()
    if key not in checkers:
        checkers[key] = read()
    return checkers[key]


def request_cache_put(key, value) -> None:
    """Keep ``value`` under ``key`` for the rest of the HTTP request (read along with something
    else); outside a request, nothing."""
    checkers = _request_checkers.get()
    if checkers is not None:
        checkers.setdefault(key, value)


def request_perm_checker(user):
    """The request's guardian checker for ``user`` (it keeps what it read), or None outside one."""
    checkers = _request_checkers.get()
    if checkers is None:
        return None
    checker = checkers.get(user.pk)
    if checker is None or checker.user is not user:
        checker = checkers[user.pk] = _one_query_checker()(user)
    return checker


@functools.cache
def _one_query_checker():
    from guardian.core import ObjectPermissionChecker  # needs the app registry: imported on first use

    class OneQueryChecker(ObjectPermissionChecker):
        """guardian's checker reading a user's rights on an object in one query (its own and
        its groups' object rights and, the first time, its role's global rights: a UNION)
        instead of three."""

        def get_perms(self, obj):
            user = self.user
            if user is None or not user.is_active or user.is_superuser:
                return super().get_perms(obj)
            key = self.get_local_cache_key(obj)
            if key not in self._obj_perms_cache:
                roles_key = ("project_roles", user.pk)
                rights = user_rights_read(
                    user,
                    obj,
                    with_global=not hasattr(user, "_perm_cache"),
                    with_roles=not request_cache_has(roles_key),
                )
                self._obj_perms_cache[key] = rights.object_perms
                if rights.global_perms is not None:
                    # What accounts.backends.LockoutModelBackend.get_all_permissions keeps.
                    user._perm_cache = rights.global_perms
                if rights.project_roles is not None:  # what accounts.selectors.project_roles_of reads
                    request_cache_put(roles_key, rights.project_roles)
            return self._obj_perms_cache[key]

    return OneQueryChecker


@dataclass(frozen=True)
class UserRights:
    object_perms: list[str]  # codenames held on the object through guardian
    global_perms: set[str] | None  # "app_label.codename" of the user's role (None: not read)
    project_roles: dict | None  # {project id: role} of the user's memberships (None: not read)


def user_rights_read(user, obj, *, with_global: bool, with_roles: bool = False) -> UserRights:
    """In one query: the codenames of the rights ``user`` holds on ``obj`` through
    django-guardian (its own and its groups': what guardian's ``get_perms`` answers); with
    ``with_global``, its global rights as ``"app_label.codename"`` (its own and its groups',
    i.e. its role's: what ``LockoutModelBackend.get_all_permissions`` answers); with
    ``with_roles``, its project memberships (what ``accounts.selectors.project_roles_of`` reads).

    Plain SQL (``_rights_sql``, built once from the models' tables): every API request on an
    object runs it, and compiling the five-part UNION through the ORM cost more CPU than the
    database's answer (issue 15)."""
    from django.contrib.contenttypes.models import ContentType
    from django.db import connection

    from accounts.models import ProjectMembership

    ctype = ContentType.objects.get_for_model(obj)  # cached per process
    parts = ["object", *(["global"] if with_global else []), *(["roles"] if with_roles else [])]
    sql = " UNION ".join(_rights_sql()[part] for part in parts)
    params: list = [user.pk, ctype.pk, str(obj.pk), ctype.pk] * 2
    params += [user.pk] * (2 if with_global else 0) + [user.pk] * (1 if with_roles else 0)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    project_roles = None
    if with_roles:
        pk_field = ProjectMembership._meta.get_field("project").target_field
        project_roles = {pk_field.to_python(first): second for first, second, scope in rows if scope == "p"}
    return UserRights(
        object_perms=sorted({codename for _, codename, scope in rows if scope == "o"}),
        global_perms={f"{app}.{codename}" for app, codename, scope in rows if scope == "g"} if with_global else None,
        project_roles=project_roles,
    )


@functools.cache
def _rights_sql() -> dict[str, str]:
    """The parts of ``user_rights_read``'s UNION (PostgreSQL and SQLite), by what they read:
    ``object`` (params: user, content type, object pk, content type; twice: the user's own
    and its groups' guardian rights), ``global`` (user; user: the user's and its groups'
    permissions), ``roles`` (user: project memberships, the project id as text) and
    ``groups`` (user: the names of the user's groups)."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group, Permission
    from django.contrib.contenttypes.models import ContentType
    from guardian.models import GroupObjectPermission, UserObjectPermission

    from accounts.models import ProjectMembership

    def table(model) -> str:
        return model._meta.db_table

    user_model = get_user_model()
    perm, ctype = table(Permission), table(ContentType)
    user_groups = table(user_model.groups.through)
    user_perms = table(user_model.user_permissions.through)
    group_perms = table(Group.permissions.through)
    named = f'JOIN "{perm}" p ON p.id = x.permission_id JOIN "{ctype}" ct ON ct.id = p.content_type_id'
    on_object = "x.content_type_id = %s AND x.object_pk = %s AND p.content_type_id = %s"
    memberships = table(ProjectMembership)
    # Only the models' own table names are formatted in; every value is a parameter.
    return {
        "object": (
            f"SELECT ct.app_label, p.codename, 'o' FROM \"{table(UserObjectPermission)}\" x {named} "  # noqa: S608
            f"WHERE x.user_id = %s AND {on_object} UNION "
            f"SELECT ct.app_label, p.codename, 'o' FROM \"{table(GroupObjectPermission)}\" x {named} "
            f'JOIN "{user_groups}" ug ON ug.group_id = x.group_id WHERE ug.user_id = %s AND {on_object}'
        ),
        "global": (
            f"SELECT ct.app_label, p.codename, 'g' FROM \"{user_perms}\" x {named} WHERE x.user_id = %s UNION "  # noqa: S608
            f"SELECT ct.app_label, p.codename, 'g' FROM \"{group_perms}\" x {named} "
            f'JOIN "{user_groups}" ug ON ug.group_id = x.group_id WHERE ug.user_id = %s'
        ),
        "roles": f"SELECT CAST(m.project_id AS TEXT), m.role, 'p' FROM \"{memberships}\" m WHERE m.user_id = %s",  # noqa: S608
        "groups": (
            f"SELECT g.name, '', 'r' FROM \"{table(Group)}\" g "  # noqa: S608
            f'JOIN "{user_groups}" ug ON ug.group_id = g.id WHERE ug.user_id = %s'
        ),
    }


@dataclass(frozen=True)
class UserStanding:
    global_perms: frozenset[str]  # "app_label.codename" of the user's own and its groups' permissions
    group_names: frozenset[str]  # the user's groups (its role: accounts.roles.user_role)
    project_roles: dict  # {project id: role} of the user's memberships


def request_user_standing(user) -> UserStanding | None:
    """Within an HTTP request (``request_perm_cache``), what the list endpoints ask of a user
    on every request: its global rights (``LockoutModelBackend.get_all_permissions``), its
    groups (``accounts.roles.user_role``) and its project memberships
    (``accounts.selectors.project_roles_of``), read together in one plain-SQL query once per
    request and forgotten when rights change (``rights_changed``). None outside a request or
    for a superuser or inactive user: callers then read what they need as before."""
    if _request_checkers.get() is None or not user.is_authenticated or not user.is_active or user.is_superuser:
        return None
    standing = request_cache(("standing", user.pk), lambda: _user_standing_read(user))
    request_cache_put(("project_roles", user.pk), standing.project_roles)  # what project_roles_of keeps
    return standing


def _user_standing_read(user) -> UserStanding:
    from django.db import connection

    from accounts.models import ProjectMembership

    sql = " UNION ".join((_rights_sql()["global"], _rights_sql()["roles"], _rights_sql()["groups"]))
    with connection.cursor() as cursor:
        cursor.execute(sql, [user.pk] * 4)
        rows = cursor.fetchall()
    pk_field = ProjectMembership._meta.get_field("project").target_field
    return UserStanding(
        global_perms=frozenset(f"{app}.{codename}" for app, codename, scope in rows if scope == "g"),
        group_names=frozenset(name for name, _, scope in rows if scope == "r"),
        project_roles={pk_field.to_python(first): second for first, second, scope in rows if scope == "p"},
    )


def rights_changed(user_ids: Iterable[int]) -> None:
    """Tell the users' open websockets to re-check their rights (after the transaction commits;
    best effort: the periodic re-check covers a lost event). Forgets what this request read."""
    checkers = _request_checkers.get()
    if checkers:
        checkers.clear()
    ids = sorted({int(pk) for pk in user_ids if pk is not None})
    if not ids:
        return

    def send() -> None:
        from sandbox_site.group_events import group_events_publish

        group_events_publish(
            [rights_group(pk) for pk in ids],
            {"type": "rights.changed"},
            what=f"rights change of user {ids[0]}" if len(ids) == 1 else f"rights change of {len(ids)} users",
        )

    transaction.on_commit(send)


def rights_changed_for_group(group) -> None:
    rights_changed(group.user_set.values_list("pk", flat=True))


def websocket_user_fresh(*, user_id, token_id=None, vm_id=None):
    """The user a websocket acts for, read again, when it is still active and its API token
    ``token_id`` (if any) is neither revoked nor expired and, when limited to a project, covers
    VM ``vm_id``; else None. An action a long-lived socket starts is authenticated again, as
    every REST request is (the user object of the handshake may be stale)."""
    from django.contrib.auth import get_user_model

    from accounts.services import token_with_user

    if token_id is None:
        return get_user_model().objects.filter(pk=user_id, is_active=True).first()
    token = token_with_user(token_id)  # the token and its user in one query
    if token is None or not token.is_active or str(token.user_id) != str(user_id) or not token.user.is_active:
        return None
    user = token.user
    if token.project_id is not None and vm_id is not None:
        from vms.models import VM

        if not VM.objects.filter(pk=vm_id, project_id=token.project_id).exists():
            return None
    return user


def websocket_rights_hold(*, user_id, token_id=None, vm_id=None, perm: str | None = None) -> bool:
    """Whether a websocket opened by ``user_id`` (with API token ``token_id``, if any) may stay
    open: the user is active, the token is neither revoked nor expired, and the user still
    holds ``vms.<perm>_vm`` on VM ``vm_id`` (when given). Fresh rows: no cached permissions."""
    from accounts.services import user_has_perm

    user = websocket_user_fresh(user_id=user_id, token_id=token_id, vm_id=vm_id)
    if user is None:
        return False
    if vm_id is not None and perm is not None:
        from vms.models import VM

        vm = VM.objects.filter(pk=vm_id).first()
        if vm is None or not user_has_perm(user, f"vms.{perm}_vm", vm):
            return False
    return True
