"""Append-only, hash-chained audit log.

Service functions call ``audit_record`` explicitly (not request signals), so work done by
Celery workers is recorded with the same detail. Each row stores the hash of the row before
it; ``audit_chain_verify`` recomputes the chain and reports the first broken link.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from django.db import connection, transaction
from django.db.models import Model
from django.utils import timezone

from accounts.context import current_context
from accounts.models import AuditEvent, AuditResult
from sandbox_site.validation import text_escape

GENESIS_HASH = "0" * 64
# Any constant works: it names the advisory lock that serialises appends to the chain.
_CHAIN_LOCK_ID = 727_105_001

_HASHED_FIELDS = (
    "created_at",
    "actor_id",
    "actor_username",
    "token_id",
    "source_ip",
    "request_id",
    "action",
    "object_type",
    "object_id",
    "object_repr",
    "object_owner_id",
    "before",
    "after",
    "result",
    "message",
)


def _canonical(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if value is None or isinstance(value, (str, int, float, bool, list, dict)):
        return value
    return str(value)


def audit_event_hash(event: AuditEvent, prev_hash: str) -> str:
    payload = {name: _canonical(getattr(event, name)) for name in _HASHED_FIELDS}
    # Hashed only when set, so rows written before the field existed keep their hashes.
    if event.client_request_id:
        payload["client_request_id"] = event.client_request_id
    payload["id"] = event.id
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256((prev_hash + text).encode()).hexdigest()


def _lock_chain() -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_CHAIN_LOCK_ID])


def audit_chain_lock() -> None:
    """Take the audit chain's lock now, before any row lock of the transaction: a service that
    locks rows and then audits would otherwise deadlock with one that audits and then locks."""
    _lock_chain()


def _json_safe(value: Any) -> Any:
    # NUL and lone surrogates escaped: an audit row must be storable and always render.
    return text_escape(json.loads(json.dumps(value, default=str))) if value is not None else None


def audit_record(
    *,
    actor,
    action: str,
    obj: Model | None = None,
    object_type: str = "",
    object_id: str = "",
    object_repr: str = "",
    object_owner_id: int | None = None,
    before: Any = None,
    after: Any = None,
    result: str = AuditResult.OK,
    message: str = "",
) -> AuditEvent:
    """Append one audit event. Runs inside the caller's transaction when there is one, so an
    action that rolls back leaves no "ok" row behind; denied/failed attempts should be
    recorded outside the rolled-back transaction."""
    ctx = current_context()
    if obj is not None:
        object_type = object_type or obj._meta.label_lower
        object_id = object_id or str(obj.pk)
        object_repr = object_repr or str(obj)[:200]
        if object_owner_id is None:
            object_owner_id = getattr(obj, "owner_id", None)
    actor_id = getattr(actor, "pk", None) if actor is not None and getattr(actor, "is_authenticated", False) else None
    with transaction.atomic():
        _lock_chain()
        # Read after the lock, in a statement of its own: a statement's snapshot is taken
        # when it starts, so reading in the locking statement could miss the last row.
        event_id, last = _next_id_and_last_hash()
        prev_hash = last or GENESIS_HASH
        event = AuditEvent(
            id=event_id,
            created_at=timezone.now(),
            actor_id=actor_id,
            actor_username=getattr(actor, "username", "") if actor_id else "",
            token_id=ctx.token_id,
            source_ip=ctx.source_ip,
            request_id=ctx.request_id,
            client_request_id=ctx.client_request_id,
            action=action,
            object_type=object_type,
            object_id=text_escape(object_id),
            object_repr=text_escape(object_repr[:200]),
            object_owner_id=object_owner_id,
            before=_json_safe(before),
            after=_json_safe(after),
            result=result,
            message=text_escape(message[:2000]),
            prev_hash=prev_hash,
            hash="",
        )
        if event.id is not None:  # PostgreSQL: the id is known before the insert
            event.hash = audit_event_hash(event, prev_hash)
            AuditEvent.objects.bulk_create([event])  # an insert only (save() refuses a preset id)
        else:
            event.save()
            # The id is part of the hash so that deleting a row is detected even at the tail's end.
            event.hash = audit_event_hash(event, prev_hash)
            AuditEvent.objects.filter(pk=event.pk).update(hash=event.hash)
    return event


def _next_id_and_last_hash() -> tuple[int | None, str | None]:
    """The id the new row gets (PostgreSQL: taken from the sequence, so its hash is known
    before the insert: one statement instead of an insert and an update) and the hash of
    the last row, in one round trip. Elsewhere: no id yet (``None``)."""
    table = AuditEvent._meta.db_table
    if connection.vendor != "postgresql":
        return None, AuditEvent.objects.order_by("-id").values_list("hash", flat=True).first()
    with connection.cursor() as cursor:
        last_hash = f'(SELECT "hash" FROM "{table}" ORDER BY "id" DESC LIMIT 1)'  # noqa: S608 - the model's table
        cursor.execute(f"SELECT nextval(pg_get_serial_sequence(%s, %s)), {last_hash}", [table, "id"])
        event_id, last = cursor.fetchone()
    return event_id, last


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    checked: int
    broken_id: int | None = None
    reason: str = ""


def audit_chain_verify() -> ChainReport:
    """Walk the chain in id order; return the first row whose link or content does not match."""
    prev_hash = GENESIS_HASH
    checked = 0
    for event in AuditEvent.objects.order_by("id").iterator(chunk_size=2000):
        if event.prev_hash != prev_hash:
            return ChainReport(False, checked, event.id, "previous row is missing or was altered")
        if audit_event_hash(event, prev_hash) != event.hash:
            return ChainReport(False, checked, event.id, "row content was altered")
        prev_hash = event.hash
        checked += 1
    return ChainReport(True, checked)
