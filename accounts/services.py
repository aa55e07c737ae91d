"""Writes for users, roles, tokens, sharing and login lockout. Every change is audited."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone
from guardian.shortcuts import assign_perm, get_perms, remove_perm

from accounts.audit import audit_record
from accounts.models import (
    PERSONAL_SLUG_PREFIX,
    ApiToken,
    AuditResult,
    LoginThrottle,
    Project,
    ProjectMembership,
    ProjectQuota,
    ProjectRole,
    Role,
)
from accounts.rights import request_perm_checker, rights_changed, rights_changed_for_group
from sandbox_site import sql_rows
from sandbox_site.errors import ApplicationError, ConflictError, NotPermitted

User = get_user_model()

TOKEN_PREFIX = "msb_"
# Only refresh last_used_at this often, so each API call does not write a row.
_LAST_USED_GRANULARITY = timedelta(seconds=60)


def owner_quota_lock(owner) -> None:
    """Serialise the quota checks of one owner: call it first inside the transaction that
    checks a limit and writes what counts against it (VMs, sizes, clones, snapshots, port
    forwards, background execs, tokens), then count. A row lock on the owner's user row
    (PostgreSQL); SQLite's immediate transactions are serialised already."""
    list(User.objects.select_for_update().filter(pk=owner.pk).values_list("pk", flat=True))


def project_quota_lock(project) -> None:
    """Serialise the quota checks of one project (its members share its budget): call it first
    inside the transaction that checks a project limit and writes what counts against it (VMs,
    sizes, clones, snapshots), then the creator's ``owner_quota_lock``, then count. Lock order:
    project quota lock -> owner quota lock -> host row -> VM rows."""
    list(Project.objects.select_for_update().filter(pk=project.pk).values_list("pk", flat=True))


# --- projects --------------------------------------------------------------------------


def project_personal_ensure(user) -> Project:
    """``user``'s personal project (created with the user; made here when missing), of which
    the user is the owner."""
    project = Project.objects.filter(personal_of=user).first()
    if project is not None:
        return project
    with transaction.atomic():
        project, _ = Project.objects.get_or_create(
            personal_of=user,
            defaults={"name": f"{user.username} (personal)"[:100], "slug": f"{PERSONAL_SLUG_PREFIX}{user.pk}"},
        )
        ProjectMembership.objects.get_or_create(project=project, user=user, defaults={"role": ProjectRole.OWNER})
    return project


def _require_project_owner(project: Project, actor, action: str) -> None:
    from accounts.selectors import project_role_of

    if project_role_of(actor, project) == ProjectRole.OWNER:
        return
    with transaction.atomic():
        audit_record(actor=actor, action=action, obj=project, result=AuditResult.DENIED, message="not a project owner")
    raise NotPermitted("Only the project's owners may do this.")


def project_create(*, name: str, slug: str, actor) -> Project:
    """A team project with ``actor`` as its owner. Users who may create VMs may create projects."""
    from django.core.validators import validate_slug

    if not user_has_perm(actor, "vms.add_vm"):
        raise NotPermitted("Your role may not create projects.")
    name, slug = (name or "").strip(), (slug or "").strip()
    errors = {}
    if not name or len(name) > 100:
        errors["name"] = "1 to 100 characters"
    try:
        validate_slug(slug)
        if len(slug) > 63 or slug.startswith(PERSONAL_SLUG_PREFIX):
            raise ValidationError("reserved")
    except ValidationError:
        errors["slug"] = f"letters, digits, - and _, at most 63, not starting with {PERSONAL_SLUG_PREFIX!r}"
    if errors:
        raise ApplicationError("Invalid project.", details=errors)
    with transaction.atomic():
        if Project.objects.filter(slug=slug).exists():
            raise ApplicationError("A project with that slug exists.", code="conflict", status_code=409)
        project = Project.objects.create(name=name, slug=slug)
        ProjectMembership.objects.create(project=project, user=actor, role=ProjectRole.OWNER)
        audit_record(actor=actor, action="project.create", obj=project, after={"name": name, "slug": slug})
    return project


def project_member_set(*, project: Project, user, role: str, actor) -> ProjectMembership:
    """Add ``user`` to ``project`` with ``role``, or change their role (project owners only).
    A personal project has one member, its user; a project keeps at least one owner."""
    _require_project_owner(project, actor, "project.member_set")
    if role not in ProjectRole.values:
        raise ApplicationError(f"Unknown role {role!r}.", details={"role": f"one of {', '.join(ProjectRole.values)}"})
    if project.personal_of_id is not None:
        raise ConflictError("A personal project has no other members; share single objects instead.")
    if not user.is_active:
        raise ApplicationError("That user is not active.", details={"user": "inactive"})
    with transaction.atomic():
        locked = list(ProjectMembership.objects.select_for_update().filter(project=project))
        current = next((m for m in locked if m.user_id == user.pk), None)
        owners = [m for m in locked if m.role == ProjectRole.OWNER]
        if current is not None and current.role == ProjectRole.OWNER and role != ProjectRole.OWNER and len(owners) == 1:
            raise ConflictError("A project keeps at least one owner.", code="last_owner")
        before = current.role if current is not None else None
        if current is None:
            current = ProjectMembership.objects.create(project=project, user=user, role=role)
        elif current.role != role:
            current.role = role
            current.save(update_fields=["role"])
        audit_record(
            actor=actor,
            action="project.member_set",
            obj=project,
            before={"user": user.username, "role": before},
            after={"user": user.username, "role": role},
        )
        rights_changed([user.pk])
    return current


def project_member_remove(*, project: Project, user, actor) -> None:
    """Remove ``user`` from ``project`` (project owners, or the member leaving). Their VMs stay
    in the project; the owners keep managing them."""
    if actor.pk != user.pk:
        _require_project_owner(project, actor, "project.member_remove")
    if project.personal_of_id == user.pk:
        raise ConflictError("Nobody leaves their personal project.")
    with transaction.atomic():
        locked = list(ProjectMembership.objects.select_for_update().filter(project=project))
        current = next((m for m in locked if m.user_id == user.pk), None)
        if current is None:
            raise ApplicationError("Not a member.", code="not_found", status_code=404)
        owners = [m for m in locked if m.role == ProjectRole.OWNER]
        if current.role == ProjectRole.OWNER and len(owners) == 1:
            raise ConflictError("A project keeps at least one owner.", code="last_owner")
        current.delete()
        audit_record(
            actor=actor,
            action="project.member_remove",
            obj=project,
            before={"user": user.username, "role": current.role},
        )
        rights_changed([user.pk])


def project_for_create(*, actor, owner, project: Project | None = None, action: str) -> Project:
    """The project a new object of ``owner`` (created by ``actor``) goes into: ``project`` when
    given, else the project the request's token is limited to, else ``owner``'s personal
    project. The actor must be an owner or member there (operators may use any project; a
    limited token only its own): a project the actor cannot see is a 404, a viewer gets 403
    (audited)."""
    from accounts.context import current_context
    from accounts.roles import user_is_operator
    from accounts.selectors import PROJECT_WRITE_ROLES, project_role_of

    scope = current_context().token_project_id
    if project is None:
        project = Project.objects.get(pk=scope) if scope is not None else project_personal_ensure(owner)
    role = project_role_of(actor, project) if actor is not None else ProjectRole.OWNER
    if scope is not None and project.pk != scope:
        role, operator = None, False  # a limited token sees no other project
    else:
        operator = actor is not None and user_is_operator(actor)
    if role in PROJECT_WRITE_ROLES or operator:
        return project
    if role is None:
        raise ApplicationError("No such project.", code="not_found", status_code=404, details={"project": "unknown"})
    with transaction.atomic():
        audit_record(actor=actor, action=action, obj=project, result=AuditResult.DENIED, message=f"project {role}")
    raise NotPermitted("Your role in this project may not create anything in it.", details={"project": role})


QUOTA_FIELDS = ("max_vms", "max_vcpus", "max_memory_mib", "max_disk_gib")


def _require_operator(actor, action: str, obj) -> None:
    from accounts.roles import user_is_operator

    if user_is_operator(actor):
        return
    with transaction.atomic():
        audit_record(actor=actor, action=action, obj=obj, result=AuditResult.DENIED, message="not an operator")
    raise NotPermitted("Only operators may change quotas.")


def _quota_values(values: dict) -> dict[str, int]:
    errors = {}
    clean = {}
    for field, value in values.items():
        if field not in QUOTA_FIELDS:
            errors[field] = "unknown field"
        elif isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1_000_000_000:
            errors[field] = "an integer from 0 to 1000000000"
        else:
            clean[field] = value
    if errors:
        raise ApplicationError("Invalid quota.", details=errors)
    return clean


def quota_user_set(*, user, values: dict, actor) -> dict[str, int]:
    """Set some of ``user``'s limits (operators; audited). Missing fields keep their value (the
    default when the user had no row). Returns the user's quota."""
    from accounts.models import UserQuota
    from accounts.selectors import quota_of_user

    _require_operator(actor, "quota.update", user)
    clean = _quota_values(values)
    with transaction.atomic():
        owner_quota_lock(user)
        before = quota_of_user(user)
        after = {**before, **clean}
        UserQuota.objects.update_or_create(user=user, defaults=after)
        audit_record(actor=actor, action="quota.update", obj=user, object_owner_id=user.pk, before=before, after=after)
    return after


def quota_project_set(*, project: Project, values: dict, actor) -> dict[str, int]:
    """Set some of ``project``'s shared limits (operators; audited). Missing fields keep their
    value. Returns the project's quota."""
    from accounts.selectors import quota_of_project

    _require_operator(actor, "quota.update", project)
    clean = _quota_values(values)
    with transaction.atomic():
        project_quota_lock(project)
        before = quota_of_project(project)
        after = {**before, **clean}
        ProjectQuota.objects.update_or_create(project=project, defaults=after)
        audit_record(actor=actor, action="quota.update", obj=project, before=before, after=after)
    return after


def token_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def token_create(
    *, user, name: str, read_only: bool = False, expires_at: datetime | None = None, project=None, actor
) -> tuple[ApiToken, str]:
    """Create a token for ``user``; returns the row and the secret (shown once, never stored).
    With ``project`` (one the user is a member of) the token sees and acts only within it."""
    name = (name or "").strip()
    if not name or len(name) > 100:
        raise ApplicationError("Token name must be 1 to 100 characters.", details={"name": "required"})
    if expires_at is not None and expires_at <= timezone.now():
        raise ApplicationError("Expiry must be in the future.", details={"expires_at": "in the past"})
    if project is not None:
        from accounts.selectors import project_role_of

        if project_role_of(user, project) is None:
            raise ApplicationError("You are not a member of that project.", details={"project": "not a member"})
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with transaction.atomic():
        owner_quota_lock(user)  # then count: parallel creates cannot all see room for one more
        active = ApiToken.objects.filter(user=user, revoked_at__isnull=True).count()
        if active >= settings.SANDBOX_TOKEN_MAX_PER_USER:
            raise ApplicationError(f"At most {settings.SANDBOX_TOKEN_MAX_PER_USER} active tokens per user.")
        token = ApiToken.objects.create(
            user=user,
            name=name,
            prefix=secret[: len(TOKEN_PREFIX) + 6],
            token_hash=token_hash(secret),
            read_only=read_only,
            expires_at=expires_at,
            project=project,
        )
        audit_record(
            actor=actor,
            action="token.create",
            obj=token,
            object_owner_id=user.pk,
            after={
                "name": name,
                "read_only": read_only,
                "expires_at": expires_at,
                "project": project.slug if project is not None else None,
            },
        )
    return token, secret


def token_revoke(*, token: ApiToken, actor) -> ApiToken:
    with transaction.atomic():
        updated = ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
        if updated:
            audit_record(actor=actor, action="token.revoke", obj=token, object_owner_id=token.user_id)
            rights_changed([token.user_id])  # websockets opened with it close
    token.refresh_from_db()
    return token


def _token_with_user(column: str, value: Any) -> ApiToken | None:
    """The token whose ``column`` is ``value`` (its hash, or its primary key) and its user, in
    one plain-SQL join (``sandbox_site.sql_rows``: every token request and every websocket start
    frame runs it; the ORM's compilation of it cost more than the query)."""
    sql = (
        f"SELECT {sql_rows.columns(ApiToken, 't')}, {sql_rows.columns(User, 'u')} "  # noqa: S608
        f'FROM "{ApiToken._meta.db_table}" t JOIN "{User._meta.db_table}" u '
        f'ON u."{User._meta.pk.column}" = t."{ApiToken.user.field.column}" '
        f'WHERE t."{column}" = %s'
    )
    row = sql_rows.first_row(sql, [value])
    if row is None:
        return None
    token = sql_rows.instance(ApiToken, "t", row)
    ApiToken.user.field.set_cached_value(token, sql_rows.instance(User, "u", row, sql_rows.width(ApiToken)))
    return token


def token_with_user(pk) -> ApiToken | None:
    """Token ``pk`` with its user (one query), whatever their state; None if there is none or
    ``pk`` is malformed."""
    value = sql_rows.pk_param(ApiToken, pk)
    return None if value is None else _token_with_user(ApiToken._meta.pk.column, value)


def token_authenticate(secret: str) -> ApiToken | None:
    """The active token with this secret whose user is active, or None."""
    if not secret.startswith(TOKEN_PREFIX) or len(secret) > 200:
        return None
    token = _token_with_user("token_hash", token_hash(secret))
    if token is None or not token.is_active or not token.user.is_active:
        return None
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at > _LAST_USED_GRANULARITY:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        token.last_used_at = now
    return token


def user_create(*, username: str, password: str, role: str, email: str = "", actor):
    """Create a user with one role. Only admins may do this."""
    if not (actor.is_superuser or actor.groups.filter(name=Role.ADMIN).exists()):
        raise NotPermitted("Only admins can create users.")
    if role not in Role.values:
        raise ApplicationError(f"Unknown role {role!r}.", details={"role": f"one of {', '.join(Role.values)}"})
    if User.objects.filter(username=username).exists():
        raise ApplicationError("A user with that username exists.", code="conflict", status_code=409)
    candidate = User(username=username, email=email)
    try:
        validate_password(password, candidate)
    except ValidationError as exc:
        raise ApplicationError("Password rejected.", details={"password": exc.messages}) from exc
    with transaction.atomic():
        user = User.objects.create_user(username=username, password=password, email=email)
        user_set_role(user=user, role=role, actor=actor, _audit=False)
        audit_record(actor=actor, action="user.create", obj=user, after={"username": username, "role": role})
    return user


def user_set_role(*, user, role: str, actor, _audit: bool = True) -> None:
    if role not in Role.values:
        raise ApplicationError(f"Unknown role {role!r}.")
    with transaction.atomic():
        before = list(user.groups.filter(name__in=Role.values).values_list("name", flat=True))
        user.groups.remove(*Group.objects.filter(name__in=Role.values))
        user.groups.add(Group.objects.get(name=role))
        is_admin = role == Role.ADMIN
        user.is_superuser = is_admin
        user.is_staff = role in (Role.ADMIN, Role.OPERATOR)
        user.save(update_fields=["is_superuser", "is_staff"])
        if _audit:
            audit_record(actor=actor, action="user.set_role", obj=user, before={"roles": before}, after={"role": role})
        rights_changed([user.pk])


def user_has_perm(user, perm: str, obj=None) -> bool:
    """Global permission (roles), the user's role in the object's project, or an object
    permission (guardian: single objects shared across projects); superusers always. A request
    with a token limited to a project sees no object of another project.

    Within one HTTP request (``request_perm_cache``) a user's object permissions on an object
    and project roles are read once (the object's and the role's global rights in one query):
    the viewset's check and the service's re-check cost one lookup, not two. Anywhere else
    (websockets, tasks) every call reads them fresh."""
    if not user.is_authenticated or not user.is_active:
        return False
    if obj is not None and not getattr(obj, "user_visible", True):  # e.g. a VM of the warm pool
        return False
    if obj is not None and not object_in_token_scope(obj):
        return False
    checker = request_perm_checker(user) if obj is not None else None
    if checker is not None and not user.is_superuser:  # (superusers hold everything: no query)
        checker.get_perms(obj)  # the role's rights come with the object's, in the same query
    if user.has_perm(perm):
        return True
    if obj is None:
        return False
    if project_grants(user, perm, getattr(obj, "project_id", None)):
        return True
    return checker.has_perm(perm, obj) if checker is not None else user.has_perm(perm, obj)


def object_in_token_scope(obj) -> bool:
    """Whether the request's token (if limited to a project) may see ``obj``: objects of that
    project, and objects of no project (shared networks, templates, images)."""
    from accounts.context import current_context

    scope = current_context().token_project_id
    return scope is None or getattr(obj, "project_id", None) in (None, scope)


def project_grants(user, perm: str, project_id) -> bool:
    """Whether ``user``'s role in project ``project_id`` gives ``perm`` on its objects. A user
    whose global role may not create VMs (viewer) is at most a viewer in any project."""
    from accounts.selectors import project_role_allows, project_role_effective

    if project_id is None:
        return False
    return project_role_allows(project_role_effective(user, project_id), perm)


def object_perms_grant(*, obj, perms: list[str], actor, user=None, group=None) -> list[str]:
    """Share ``obj`` with a user or group. The actor may only hand on rights it holds itself."""
    if (user is None) == (group is None):
        raise ApplicationError("Give exactly one of user or group.")
    app_label = obj._meta.app_label
    allowed = set(obj.__class__.object_permission_codenames())
    unknown = [p for p in perms if p not in allowed]
    if unknown or not perms:
        raise ApplicationError(
            "Unknown or missing permissions.", details={"allowed": sorted(allowed), "unknown": unknown}
        )
    missing = [p for p in perms if not user_has_perm(actor, f"{app_label}.{p}", obj)]
    if missing:
        raise NotPermitted("You can only share rights you hold yourself.", details={"missing": missing})
    target = user or group
    with transaction.atomic():
        before = sorted(get_perms(target, obj))
        for perm in perms:
            assign_perm(f"{app_label}.{perm}", target, obj)
        after = sorted(get_perms(target, obj))
        audit_record(
            actor=actor,
            action="permission.grant",
            obj=obj,
            before={"grantee": _grantee(user, group), "perms": before},
            after={"grantee": _grantee(user, group), "perms": after},
        )
    return after


def object_perms_revoke(*, obj, perms: list[str] | None, actor, user=None, group=None) -> list[str]:
    if (user is None) == (group is None):
        raise ApplicationError("Give exactly one of user or group.")
    if user is not None and user.pk == getattr(obj, "owner_id", None):
        raise ApplicationError("The owner's rights cannot be revoked.", code="conflict", status_code=409)
    app_label = obj._meta.app_label
    target = user or group
    with transaction.atomic():
        before = sorted(get_perms(target, obj))
        for perm in perms or before:
            remove_perm(f"{app_label}.{perm}", target, obj)
        after = sorted(get_perms(target, obj))
        if user is not None:
            rights_changed([user.pk])
        else:
            rights_changed_for_group(group)
        audit_record(
            actor=actor,
            action="permission.revoke",
            obj=obj,
            before={"grantee": _grantee(user, group), "perms": before},
            after={"grantee": _grantee(user, group), "perms": after},
        )
    return after


def _grantee(user, group) -> str:
    return f"user:{user.username}" if user is not None else f"group:{group.name}"


# --- login lockout ---------------------------------------------------------------------
#
# Two counters per account, both in LoginThrottle rows, both counted before the password is
# checked (under a row lock, so parallel guesses cannot slip past the limit):
# - (account, client address): SANDBOX_LOCKOUT_THRESHOLD failures lock this pair for
#   SANDBOX_LOCKOUT_SECONDS. Other addresses (the real user) are not affected.
# - the account from everywhere: past SANDBOX_LOGIN_ACCOUNT_CEILING failures each further
#   attempt must wait a delay that doubles up to SANDBOX_LOGIN_BACKOFF_MAX_SECONDS: a
#   distributed guesser is slowed down, but nobody can lock an account (the admin's) for long.
# A success clears both. Operators unlock in the admin, with POST /api/v1/users/{id}/unlock/
# or ``manage.py unlock_user`` (from the console, also for the admin itself).


class LoginRefused(Exception):
    """The attempt is refused before the password is checked (locked pair or back-off)."""

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


def _throttle_row(username: str, address: str) -> LoginThrottle:
    LoginThrottle.objects.get_or_create(username=username, address=address)
    return LoginThrottle.objects.select_for_update().get(username=username, address=address)


def _backoff_seconds(failures: int) -> int:
    over = failures - settings.SANDBOX_LOGIN_ACCOUNT_CEILING
    if over < 0:
        return 0
    return int(min(settings.SANDBOX_LOGIN_BACKOFF_MAX_SECONDS, 2 ** min(over, 30)))


def login_attempt_begin(*, username: str, address: str | None) -> None:
    """Count this attempt before the password is checked; raise ``LoginRefused`` when the
    (account, address) pair is locked or the account is in back-off. Atomic per account."""
    username, address = username[:150], (address or "")[:45]
    now = timezone.now()
    window = timedelta(seconds=settings.SANDBOX_LOCKOUT_SECONDS)
    refused: LoginRefused | None = None
    with transaction.atomic():
        account = _throttle_row(username, "")
        pair = _throttle_row(username, address) if address else None
        for row in (account, pair):
            if row is not None and row.last_failure_at and now - row.last_failure_at > window:
                row.failures, row.locked_until, row.next_attempt_at = 0, None, None
        if pair is not None and pair.locked_until and pair.locked_until > now:
            refused = LoginRefused(
                "Too many failed logins from your address: try again later.",
                retry_after=int((pair.locked_until - now).total_seconds()) + 1,
            )
        elif account.next_attempt_at and account.next_attempt_at > now:
            refused = LoginRefused(
                "Too many failed logins for this account: slow down.",
                retry_after=int((account.next_attempt_at - now).total_seconds()) + 1,
            )
        else:
            # Counted as failed until the password proves otherwise (login_succeeded clears it).
            for row in (account, pair):
                if row is None:
                    continue
                row.failures += 1
                row.last_failure_at = now
            if pair is not None and pair.failures >= settings.SANDBOX_LOCKOUT_THRESHOLD:
                pair.locked_until = now + window
            delay = _backoff_seconds(account.failures)
            account.next_attempt_at = now + timedelta(seconds=delay) if delay else None
        for row in (account, pair):
            if row is not None:
                row.save()
    if refused is not None:
        login_blocked(username=username, message=refused.message)
        raise refused
    if secrets.randbelow(100) == 0:  # rows of guessed usernames and old failures: drop now and then
        LoginThrottle.objects.filter(last_failure_at__lt=now - 2 * window).delete()


def login_refusal(*, username: str, address: str | None) -> LoginRefused | None:
    """Read-only: why an attempt now would be refused (for the login form's message), or None."""
    now = timezone.now()
    window = timedelta(seconds=settings.SANDBOX_LOCKOUT_SECONDS)
    found = LoginThrottle.objects.filter(username=username[:150], address__in=["", address or ""])
    rows = {r.address: r for r in found}
    pair, account = rows.get(address or "") if address else None, rows.get("")
    if pair is not None and pair.locked_until and pair.locked_until > now and now - pair.last_failure_at <= window:
        return LoginRefused("locked", retry_after=int((pair.locked_until - now).total_seconds()) + 1)
    if account is not None and account.next_attempt_at and account.next_attempt_at > now:
        return LoginRefused("slow down", retry_after=int((account.next_attempt_at - now).total_seconds()) + 1)
    return None


def login_failed(*, username: str) -> None:
    """Audit a wrong password (the attempt was already counted by ``login_attempt_begin``)."""
    user = User.objects.filter(username=username).first()
    with transaction.atomic():
        audit_record(
            actor=None,
            action="auth.login_failed",
            object_type="auth.user",
            object_id=str(user.pk) if user else "",
            object_repr=username[:150],
            object_owner_id=user.pk if user else None,
            result=AuditResult.DENIED,
        )


def login_blocked(*, username: str, message: str = "attempt while locked out") -> None:
    user = User.objects.filter(username=username).first()
    with transaction.atomic():
        audit_record(
            actor=None,
            action="auth.login_locked",
            object_type="auth.user",
            object_id=str(user.pk) if user else "",
            object_repr=username[:150],
            object_owner_id=user.pk if user else None,
            result=AuditResult.DENIED,
            message=message,
        )


def login_succeeded(*, user, address: str | None = None) -> None:
    """Clear the failure counts (every successful authentication, HTTP basic included): the
    pair's and the account's, since the right password came."""
    LoginThrottle.objects.filter(username=user.username, address__in=["", (address or "")[:45]]).delete()


def user_unlock(*, username: str, actor) -> int:
    """Clear every lock and back-off of ``username`` (operators; ``manage.py unlock_user``
    passes ``actor=None`` from the console). Returns the rows removed."""
    if actor is not None:
        from accounts.roles import user_is_operator

        if not user_is_operator(actor):
            with transaction.atomic():
                audit_record(
                    actor=actor,
                    action="auth.unlock",
                    object_type="auth.user",
                    object_repr=username[:150],
                    result=AuditResult.DENIED,
                    message="not an operator",
                )
            raise NotPermitted("Only operators can unlock accounts.")
    with transaction.atomic():
        removed, _ = LoginThrottle.objects.filter(username=username).delete()
        user = User.objects.filter(username=username).first()
        audit_record(
            actor=actor,
            action="auth.unlock",
            object_type="auth.user",
            object_id=str(user.pk) if user else "",
            object_repr=username[:150],
            object_owner_id=user.pk if user else None,
            message=f"{removed} throttle rows cleared" + ("" if actor is not None else " from the console"),
        )
    return removed


def session_login_recorded(*, user) -> None:
    """Audit a dashboard/admin login (HTTP basic requests are not logins and are not recorded)."""
    audit_record(actor=user, action="auth.login", obj=user, object_owner_id=user.pk)
