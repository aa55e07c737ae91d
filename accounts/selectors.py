from __future__ import annotations

from datetime import datetime

from django.db.models import Q

from accounts.models import ApiToken, AuditEvent
from accounts.roles import user_is_operator
from sandbox_site.validation import datetime_checked


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
