"""The one place API object permissions are enforced.

``ObjectPermissionViewSet`` is the base of every API viewset over an owned object:
- list endpoints return only rows the user may view;
- an object the user may not view is invisible: 404;
- a visible object whose action the user may not perform: 403, and an audit row (denied);
- services re-check the permission inside their transaction before writing.
"""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import transaction
from guardian.shortcuts import get_objects_for_user
from rest_framework import viewsets
from rest_framework.exceptions import NotFound

from accounts.audit import audit_record
from accounts.models import AuditResult
from accounts.services import user_has_perm
from sandbox_site.errors import NotPermitted


def visible_queryset(user, queryset, perm: str = "view"):
    """Rows of ``queryset`` on which ``user`` holds ``perm`` (globally or per object)."""
    model = queryset.model
    codename = f"{model._meta.app_label}.{perm}_{model._meta.model_name}"
    return get_objects_for_user(user, codename, klass=queryset, accept_global_perms=True, with_superuser=True)


def permission_denied(*, user, obj, perm: str, action: str) -> NotPermitted:
    """Record a denied attempt (in its own transaction) and return the error to raise."""
    with transaction.atomic():
        audit_record(actor=user, action=action, obj=obj, result=AuditResult.DENIED, message=f"missing {perm}")
    return NotPermitted(f"You do not have the '{perm}' permission on this {obj._meta.verbose_name}.")


class ObjectPermissionViewSet(viewsets.GenericViewSet):
    """Base viewset for owned objects. Subclasses set ``queryset`` and may extend
    ``action_perms`` (viewset action name -> permission prefix, e.g. ``"start": "power"``)."""

    lookup_field = "id"
    base_action_perms = {
        "list": "view",
        "retrieve": "view",
        "update": "change",
        "partial_update": "change",
        "destroy": "delete",
    }
    action_perms: dict[str, str] = {}
    audit_prefix = ""

    def required_perm(self) -> str:
        perms = {**self.base_action_perms, **self.action_perms}
        try:
            return perms[self.action]
        except KeyError as exc:  # an action without a declared permission must not be reachable
            raise NotPermitted(f"Action {self.action!r} has no permission rule.") from exc

    def perm_codename(self, perm: str) -> str:
        meta = self.queryset.model._meta
        return f"{meta.app_label}.{perm}_{meta.model_name}"

    def get_queryset(self):
        return visible_queryset(self.request.user, super().get_queryset(), "view")

    def get_object(self):
        queryset = self.filter_queryset(self.get_queryset())
        lookup = {self.lookup_field: self.kwargs[self.lookup_url_kwarg or self.lookup_field]}
        try:
            obj = queryset.get(**lookup)
        except (queryset.model.DoesNotExist, ValueError, TypeError, ValidationError) as exc:
            # A malformed id is as invisible as a missing one: 404, never a 500.
            raise NotFound() from exc
        perm = self.required_perm()
        if perm != "view" and not user_has_perm(self.request.user, self.perm_codename(perm), obj):
            prefix = self.audit_prefix or self.queryset.model._meta.model_name
            raise permission_denied(user=self.request.user, obj=obj, perm=perm, action=f"{prefix}.{self.action}")
        return obj
