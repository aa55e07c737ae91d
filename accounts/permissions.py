"""The one place object permissions are enforced.

- ``require_perm``: checks a right, records a refusal (audit row with result ``denied``) and
  raises ``NotPermitted`` (403). Services call it before they write; the viewsets and the
  websocket consumers reach it through ``object_or_404``/``vm_for`` and the two base viewsets.
- ``vm_for``: the VM named in a URL as a user may use it: invisible (or a malformed id) -> 404,
  visible but without the right -> 403 + audit. The VM endpoints, the VM's nested resources and
  the console, exec and events websockets all resolve VMs through it.
- ``ObjectPermissionViewSet``: base of every API viewset over an owned object (VMs,
  snapshots, networks): list endpoints return only rows the user may view, an invisible
  object is a 404, a visible one whose action the user may not perform is a 403 + audit.
- ``VmNestedViewSet``: base of a VM's nested resources (``/api/v1/vms/{vm_id}/...``:
  snapshots, execs, files, port forwards, NICs, egress): the VM is resolved with ``vm_for``
  before any handler runs, with the VM right each action declares.

Every viewset action declares the permission it needs; an action without one is refused.
tests/permission_matrix.py runs the same persona matrix against every endpoint.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import ValidationError
from django.db import connections, transaction
from django.db.models import Model, Q, QuerySet, UUIDField
from django.db.models.expressions import RawSQL
from guardian.models import GroupObjectPermission, UserObjectPermission
from guardian.shortcuts import get_objects_for_user
from rest_framework import viewsets
from rest_framework.exceptions import NotFound

from accounts.audit import audit_record
from accounts.context import current_context
from accounts.models import AuditResult
from accounts.selectors import project_ids_with
from accounts.services import user_has_perm
from sandbox_site.errors import ApplicationError, NotPermitted
from vms.models import VM, VM_ROW_RELATED


def visible_queryset(user, queryset, perm: str = "view"):
    """Rows of ``queryset`` on which ``user`` holds ``perm``: globally, through their role in
    the row's project, or per object (guardian). A token limited to a project sees only it.

    The per-object part gives the same rows as guardian's ``get_objects_for_user``, built as one
    ``pk IN (user rights UNION group rights)`` subquery on guardian's indexed columns instead of
    guardian's nested casts (PostgreSQL, UUID keys; elsewhere guardian's own query):
    tests/web/test_api_rows.py compares the two."""
    model = queryset.model
    codename = f"{perm}_{model._meta.model_name}"
    dotted = f"{model._meta.app_label}.{codename}"
    if hasattr(model, "users_may_see"):  # e.g. warm-pool VMs: nobody's until a create takes one
        queryset = queryset.filter(model.users_may_see())
    in_projects = _has_project(model)
    if in_projects:
        queryset = token_scope_filter(queryset)
    if (
        not user.is_authenticated
        or not isinstance(model._meta.pk, UUIDField)
        or connections[queryset.db].vendor != "postgresql"  # SQLite keeps UUIDs as bare hex
    ):
        granted = get_objects_for_user(user, dotted, klass=queryset, accept_global_perms=True, with_superuser=True)
        if not in_projects or not user.is_authenticated or user.is_superuser or user.has_perm(dotted):
            return granted
        project_ids = project_ids_with(user, dotted)
        if not project_ids:
            return granted
        return queryset.filter(Q(pk__in=granted.values("pk")) | Q(project_id__in=project_ids))
    if user.is_superuser or user.has_perm(dotted):
        return queryset
    by_object = Q(pk__in=_object_rights(user, model, codename))
    project_ids = project_ids_with(user, dotted) if in_projects else []
    return queryset.filter(by_object | Q(project_id__in=project_ids) if project_ids else by_object)


def _object_rights(user, model, codename: str) -> RawSQL:
    """The keys of the ``model`` rows on which ``user`` holds ``codename`` through guardian (its
    own and its groups' object rights), as a subquery: the rows guardian's
    ``get_objects_for_user`` finds without global rights (PostgreSQL, UUID keys).

    Plain SQL (``_OBJECT_RIGHTS_SQL``): the list endpoints build it on every request, and
    building and compiling it through the ORM (two querysets, a cast, a union) cost more CPU
    than the database's answer (issue 15)."""
    content_type = ContentType.objects.get_for_model(model)  # cached per process
    params = (user.pk, content_type.pk, codename, content_type.pk) * 2
    return RawSQL(_object_rights_sql(), params, output_field=UUIDField())  # noqa: S611 - values are parameters


@functools.cache
def _object_rights_sql() -> str:
    """``_object_rights``' subquery; params: user, content type, codename, content type, once
    for the user's own rights and once for its groups'."""
    user_perms, group_perms = UserObjectPermission._meta.db_table, GroupObjectPermission._meta.db_table
    user_groups = get_user_model().groups.through._meta.db_table
    named = f'JOIN "{Permission._meta.db_table}" p ON p.id = x.permission_id'
    of = "x.content_type_id = %s AND p.codename = %s AND p.content_type_id = %s"
    # Only the models' own table names are formatted in; every value is a parameter.
    return (
        f'SELECT CAST(x.object_pk AS uuid) FROM "{user_perms}" x {named} WHERE x.user_id = %s AND {of} '  # noqa: S608
        f'UNION ALL SELECT CAST(x.object_pk AS uuid) FROM "{group_perms}" x {named} '
        f'JOIN "{user_groups}" ug ON ug.group_id = x.group_id WHERE ug.user_id = %s AND {of}'
    )


def _has_project(model) -> bool:
    return any(f.name == "project" for f in model._meta.get_fields())


def token_scope_filter(queryset):
    """``queryset`` narrowed to the project the request's token is limited to (rows of no
    project, such as shared networks, stay)."""
    scope = current_context().token_project_id
    if scope is None:
        return queryset
    return queryset.filter(Q(project_id=scope) | Q(project__isnull=True))


def require_perm(
    actor, perm: str, obj: Model | None, *, action: str, allowed: bool | None = None, message: str = ""
) -> None:
    """Refuse ``action`` on ``obj`` unless ``actor`` holds ``perm`` (``"app.codename"``, held
    globally through a role or on ``obj`` through django-guardian; superusers hold everything).
    Without ``obj`` only the role's global rights count (creating: there is no object yet).

    A refusal writes an audit row (result ``denied``, message ``missing <perm>``) in its own
    transaction and raises ``NotPermitted``. Call it before opening the transaction of the
    write it guards (a re-check inside it is fine, but a refusal there is rolled back with it).

    ``allowed`` is the decision of a model's own rule where guardian alone does not state it
    (a snapshot follows its VM; everyone may use a shared network): the refusal is the same.
    """
    if allowed is None:
        allowed = user_has_perm(actor, perm, obj)
    if allowed:
        return
    codename = perm.split(".", 1)[-1]
    with transaction.atomic():
        audit_record(actor=actor, action=action, obj=obj, result=AuditResult.DENIED, message=f"missing {perm}")
    where = f"on this {obj._meta.verbose_name}" if obj is not None else "in your role"
    raise NotPermitted(
        message or f"You do not have the '{codename}' permission {where}.", details={"permission": codename}
    )


def object_or_404(queryset: QuerySet, **lookup: Any) -> Any:
    """The one row of ``queryset`` (already narrowed to what the user may see) matching
    ``lookup``; a missing row and a malformed id are the same 404, never a 500."""
    try:
        return queryset.get(**lookup)
    except (queryset.model.DoesNotExist, ValueError, TypeError, ValidationError) as exc:
        raise NotFound() from exc


def project_or_404(user, ref):
    """The project ``ref`` (id or slug) named in a request, as ``user`` may see it: a project
    they are not a member of (operators see all; a token limited to a project sees only it),
    or none by that name, is the same 404."""
    from accounts.selectors import project_by_ref, project_visible_to

    project = project_by_ref(ref)
    if project is None or not project_visible_to(user, project):
        raise ApplicationError("No such project.", code="not_found", status_code=404, details={"project": "unknown"})
    return project


def vm_for(user, vm_id, perm: str = "view", *, action: str, related: tuple[str, ...] = VM_ROW_RELATED) -> VM:
    """The VM ``vm_id`` for ``user`` to perform ``action``: ``NotFound`` when the user may not
    view it (or the id is malformed), ``NotPermitted`` (audited) when they may view it but do
    not hold ``vms.<perm>_vm``. ``related``: the rows read with it (``select_related``)."""
    # The row by id, then the view right on it: the same answer as filtering by
    # ``visible_queryset`` (global right, object right, superuser), without compiling its
    # permission subqueries; the object rights read here serve the next check of this request.
    from vms.selectors import vm_row  # vms.selectors reads visible_queryset from here

    vm = vm_row(vm_id, related)
    if vm is None:  # a missing row or a malformed id
        raise NotFound()
    vm.read_at = time.monotonic()  # services may skip re-reading its state (vms.exec_services)
    if not user_has_perm(user, "vms.view_vm", vm):
        raise NotFound()
    if perm != "view":
        require_perm(user, f"vms.{perm}_vm", vm, action=action)
    return vm


class _DeclaredPerms:
    """Per-action permission table shared by both bases."""

    base_action_perms: dict[str, str] = {}
    action_perms: dict[str, str] = {}
    audit_prefix = ""
    action: str | None

    def required_perm(self) -> str:
        # OPTIONS (DRF's "metadata" action) describes an endpoint: as visible as the object.
        perms = {"metadata": "view", **self.base_action_perms, **self.action_perms}
        try:
            return perms[self.action or ""]
        except KeyError as exc:  # an action without a declared permission must not be reachable
            raise NotPermitted(f"Action {self.action!r} has no permission rule.") from exc

    def audit_action(self) -> str:
        return f"{self.audit_prefix}.{self.action}"


class ObjectPermissionViewSet(_DeclaredPerms, viewsets.GenericViewSet):
    """Base viewset for owned objects. Subclasses set ``queryset`` (``get_queryset`` is what
    the user may view), ``audit_prefix`` and extend ``action_perms`` (viewset action name ->
    permission prefix, e.g. ``"start": "power"``). A model whose rights are not plain guardian
    rights overrides ``has_object_perm``."""

    lookup_field = "id"
    base_action_perms = {
        "create": "add",  # no object yet: the service checks the role's global add right
        "list": "view",
        "retrieve": "view",
        "update": "change",
        "partial_update": "change",
        "destroy": "delete",
    }

    def perm_codename(self, perm: str) -> str:
        meta = self.queryset.model._meta
        return f"{meta.app_label}.{perm}_{meta.model_name}"

    def has_object_perm(self, perm: str, obj) -> bool:
        return user_has_perm(self.request.user, self.perm_codename(perm), obj)

    def get_queryset(self):
        return visible_queryset(self.request.user, super().get_queryset(), "view")

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)  # authentication and token scope first: 401
        # A detail route checks its object before any handler runs, so none can forget to.
        self._object = None
        if self.action is None:
            return  # no handler for this method: DRF answers 405, touching nothing
        if (self.lookup_url_kwarg or self.lookup_field) in kwargs:
            self._object = self._checked_object()

    def get_object(self):
        cached = getattr(self, "_object", None)
        return cached if cached is not None else self._checked_object()

    def _checked_object(self):
        lookup = {self.lookup_field: self.kwargs[self.lookup_url_kwarg or self.lookup_field]}
        obj = object_or_404(self.filter_queryset(self.get_queryset()), **lookup)
        perm = self.required_perm()
        if perm != "view":  # seeing the object is the view right
            require_perm(
                self.request.user,
                self.perm_codename(perm),
                obj,
                action=self.audit_action(),
                allowed=self.has_object_perm(perm, obj),
            )
        return obj


class VmNestedViewSet(_DeclaredPerms, viewsets.GenericViewSet):
    """Base of a VM's nested resources, ``/api/v1/vms/{vm_id}/<resource>/``.

    Before any handler runs, the VM in the URL is resolved with ``vm_for`` and the VM right
    the action declares in ``action_perms`` (``view``, ``change``, ``exec``, ``snapshot``...):
    404 when the VM is invisible, 403 + audit (``<audit_prefix>.<action>``) when the right is
    missing. Handlers use ``self.vm``; the services they call re-check the right."""

    queryset = VM.objects.all()  # for the schema's path parameter; rows come from vm_for
    vm_related: tuple[str, ...] = VM_ROW_RELATED  # what handlers read of the VM's related rows
    lookup_url_kwarg = "vm_id"
    audit_prefix = "vm"
    pagination_class = None
    vm: VM

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)  # authentication and token scope first: 401
        if self.action is None:
            return  # no handler for this method: DRF answers 405, touching nothing
        self.vm = vm_for(
            request.user,
            kwargs[self.lookup_url_kwarg],
            self.required_perm(),
            action=self.audit_action(),
            related=self.vm_related,
        )

    def get_object(self):
        return self.vm
