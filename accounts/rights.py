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


def request_cache(key, read):
    """``read()``, kept for the rest of the HTTP request under ``key`` (emptied with the
    checkers when rights change); outside a request, always fresh."""
    checkers = _request_checkers.get()
    if checkers is None:
        return read()
    if key not in checkers:
        checkers[key] = read()
    return checkers[key]


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
                global_perms, self._obj_perms_cache[key] = user_rights_read(
                    user, obj, with_global=not hasattr(user, "_perm_cache")
                )
                if global_perms is not None:
                    # What accounts.backends.LockoutModelBackend.get_all_permissions keeps.
                    user._perm_cache = global_perms
            return self._obj_perms_cache[key]

    return OneQueryChecker


def user_rights_read(user, obj, *, with_global: bool) -> tuple[set[str] | None, list[str]]:
    """In one query: the codenames of the rights ``user`` holds on ``obj`` through
    django-guardian (its own and its groups': what guardian's ``get_perms`` answers) and, with
    ``with_global``, its global rights as ``"app_label.codename"`` (its own and its groups',
    i.e. its role's: what ``LockoutModelBackend.get_all_permissions`` answers; else None)."""
    from django.contrib.auth.models import Permission
    from django.contrib.contenttypes.models import ContentType
    from django.db.models import Value
    from guardian.models import GroupObjectPermission, UserObjectPermission

    ctype = ContentType.objects.get_for_model(obj)  # cached per process
    where = {"content_type": ctype, "object_pk": str(obj.pk), "permission__content_type": ctype}
    fields = ("permission__content_type__app_label", "permission__codename", "scope")
    parts = [
        UserObjectPermission.objects.filter(user=user, **where).annotate(scope=Value("o")).values_list(*fields),
        GroupObjectPermission.objects.filter(group__user=user, **where).annotate(scope=Value("o")).values_list(*fields),
    ]
    if with_global:
        fields = ("content_type__app_label", "codename", "scope")
        parts += [
            Permission.objects.filter(user=user).annotate(scope=Value("g")).values_list(*fields),
            Permission.objects.filter(group__user=user).annotate(scope=Value("g")).values_list(*fields),
        ]
    # No ORDER BY in the parts (Permission's default ordering): SQLite refuses one in a UNION's subqueries.
    parts = [part.order_by() for part in parts]
    rows = set(parts[0].union(*parts[1:]))
    global_perms = {f"{app}.{codename}" for app, codename, scope in rows if scope == "g"} if with_global else None
    return global_perms, sorted({codename for _, codename, scope in rows if scope == "o"})


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


def websocket_rights_hold(*, user_id, token_id=None, vm_id=None, perm: str | None = None) -> bool:
    """Whether a websocket opened by ``user_id`` (with API token ``token_id``, if any) may stay
    open: the user is active, the token is neither revoked nor expired, and the user still
    holds ``vms.<perm>_vm`` on VM ``vm_id`` (when given). Fresh rows: no cached permissions."""
    from django.contrib.auth import get_user_model

    from accounts.models import ApiToken
    from accounts.services import user_has_perm

    user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
    if user is None:
        return False
    if token_id is not None:
        token = ApiToken.objects.filter(pk=token_id).first()
        if token is None or not token.is_active:
            return False
        if token.project_id is not None and vm_id is not None:
            from vms.models import VM

            if not VM.objects.filter(pk=vm_id, project_id=token.project_id).exists():
                return False
    if vm_id is not None and perm is not None:
        from vms.models import VM

        vm = VM.objects.filter(pk=vm_id).first()
        if vm is None or not user_has_perm(user, f"vms.{perm}_vm", vm):
            return False
    return True
