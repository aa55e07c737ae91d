"""Admin-site changes go into the hash-chained audit log.

``SandboxAdminConfig`` (in INSTALLED_APPS instead of ``django.contrib.admin``) makes
``AuditedAdminSite`` the default site; its ``register`` puts ``AuditedModelAdminMixin`` in
front of every ModelAdmin, ours and Django's (users, groups) alike, so an edit made in the admin
(un-revoking a token, raising a quota, making somebody staff) writes an ``admin.add`` /
``admin.change`` / ``admin.delete`` row with the changed fields' values before and after, in
the admin's own transaction. Secrets (password hashes, token hashes) are recorded as changed,
never with their values.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.admin.apps import AdminConfig

SECRET_FIELDS = {"password", "token_hash"}
_BEFORE = "_sandbox_audit_before"


def _value(obj, field) -> Any:
    if field.many_to_many:
        if obj.pk is None:
            return []
        return sorted(str(pk) for pk in getattr(obj, field.name).values_list("pk", flat=True))
    value = getattr(obj, field.attname)
    if field.name in SECRET_FIELDS:
        return "(secret)"
    return value


def admin_object_state(obj) -> dict[str, Any]:
    """Field values of ``obj`` as stored (foreign keys as ids, many-to-many as sorted ids)."""
    meta = obj._meta
    fields = [f for f in meta.concrete_fields] + list(meta.many_to_many)
    return {f.name: _value(obj, f) for f in fields}


def _secret_changed(before: dict, after: dict, old, new) -> None:
    for name in SECRET_FIELDS:
        if name in after and old is not None and getattr(old, name, None) != getattr(new, name, None):
            before[name], after[name] = "(secret)", "(secret, changed)"


class AuditedModelAdminMixin:
    """Audit rows for admin saves and deletions (see the module docstring)."""

    def save_model(self, request, obj, form, change):
        old = type(obj)._default_manager.filter(pk=obj.pk).first() if change and obj.pk is not None else None
        setattr(request, _BEFORE, (old, admin_object_state(old) if old is not None else None))
        super().save_model(request, obj, form, change)

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)  # many-to-many (groups...) saved now
        from accounts.audit import audit_record

        obj = form.instance
        old, before = getattr(request, _BEFORE, (None, None))
        after = admin_object_state(obj)
        if before is not None:
            changed = {k for k in after if before.get(k) != after[k]}
            before = {k: before.get(k) for k in sorted(changed)}
            after = {k: after[k] for k in sorted(changed)}
            _secret_changed(before, after, old, obj)
        _rights_changed_by(obj)
        audit_record(
            actor=request.user,
            action="admin.change" if change else "admin.add",
            obj=obj,
            object_owner_id=_owner_id(obj),
            before=before,
            after=after,
            message=f"admin site: {obj._meta.label}",
        )

    def delete_model(self, request, obj):
        _audit_delete(request, obj)
        super().delete_model(request, obj)

    def delete_queryset(self, request, queryset):
        for obj in queryset:
            _audit_delete(request, obj)
        super().delete_queryset(request, queryset)


def _owner_id(obj) -> int | None:
    for name in ("owner_id", "user_id", "vm_owner_id"):
        value = getattr(obj, name, None)
        if isinstance(value, int):
            return value
    return obj.pk if obj._meta.label_lower == "auth.user" else None


def _rights_changed_by(obj) -> None:
    """An admin edit of a user, group, token or object permission: that user's (or group's)
    open websockets re-check their rights."""
    from django.contrib.auth.models import Group

    from accounts.rights import rights_changed, rights_changed_for_group

    if isinstance(obj, Group):
        rights_changed_for_group(obj)
    elif obj._meta.label_lower == "auth.user":
        rights_changed([obj.pk])
    elif isinstance(getattr(obj, "user_id", None), int):
        rights_changed([obj.user_id])
    elif isinstance(getattr(obj, "group", None), Group):
        rights_changed_for_group(obj.group)


def _audit_delete(request, obj) -> None:
    from accounts.audit import audit_record

    _rights_changed_by(obj)

    audit_record(
        actor=request.user,
        action="admin.delete",
        obj=obj,
        object_owner_id=_owner_id(obj),
        before=admin_object_state(obj),
        message=f"admin site: {obj._meta.label}",
    )


class AuditedAdminSite(admin.AdminSite):
    def register(self, model_or_iterable, admin_class=None, **options):
        base = admin_class or admin.ModelAdmin
        if not issubclass(base, AuditedModelAdminMixin):
            base = type(f"Audited{base.__name__}", (AuditedModelAdminMixin, base), {"__module__": base.__module__})
        return super().register(model_or_iterable, base, **options)


class SandboxAdminConfig(AdminConfig):
    default_site = "accounts.admin_audit.AuditedAdminSite"
