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
    from guardian.core import ObjectPermissionChecker

    checker = checkers.get(user.pk)
    if checker is None or checker.user is not user:
        checker = checkers[user.pk] = ObjectPermissionChecker(user)
    return checker


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
