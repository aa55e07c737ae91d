"""Append-only, hash-chained audit log.

Service functions call ``audit_record`` explicitly (not request signals), so work done by
Celery workers is recorded with the same detail.

Writing and chaining are two steps, so that the chain's lock is never held by a transaction
that takes other locks:

1. ``audit_record`` inserts the row **unsealed** (``chain_seq`` null, no hashes) inside the
   caller's transaction, taking no lock: an action that rolls back leaves no row behind, and
   services may lock rows (owner quota, host, VM, NIC rows) before or after auditing in any order.
2. ``audit_chain_seal`` **seals** committed rows: in its own short transaction it takes the
   chain's advisory lock, reads the tail, and gives each unsealed row, in id order, the next
   ``chain_seq``, the tail's hash as ``prev_hash`` and its own ``hash``. It runs after every
   commit that wrote audit rows (``transaction.on_commit``) and periodically (Celery beat,
   ``SANDBOX_AUDIT_SEAL_SECONDS``) for rows whose commit-time sealing did not happen (a process
   that died between commit and callback, a lock timeout). In an HTTP request
   (``audit_seal_after_response``, set by ``RequestContextMiddleware``) the commit-time sealing
   waits until the response has been sent: the rows are committed before the client is
   answered, only their link into the chain comes a moment later (about 10 statements and the
   chain lock off every audited request's latency: docs/benchmarks.md, "Exec overhead").

Why this and not taking the chain lock first in every write transaction: the lock was held
until the outer transaction committed, so any transaction that audited and then locked a row
could deadlock with one that locked that row and then audited (PostgreSQL aborts one, the
client gets a 500), and every audited write in the system was serialised for its whole
duration. Taking the lock first everywhere would need one entry point covering every writer
(requests, Celery tasks, consumers, management commands, hostd callbacks) and would serialise
them all. Here the only transaction that ever holds the chain lock is the sealer's, which takes
no lock but that one and the row locks of the unsealed rows it updates (no other writer
updates audit rows): a deadlock with it is impossible by construction, whatever order callers
lock in.

What the chain proves is unchanged: ``audit_chain_verify`` walks the sealed rows in
``chain_seq`` order and reports the first one that is missing (a gap in the sequence or a
broken link), altered (its hash), or moved (its link); the chain order is the seal order,
which is the commit order up to the sealer's batches. Unsealed rows are counted, and any older
than ``SANDBOX_AUDIT_SEAL_GRACE_SECONDS`` fail the verification: a row that is not sealed soon
after its commit is not protected by the chain, so it is reported rather than trusted.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Model
from django.utils import timezone

from accounts.context import current_context
from accounts.models import AuditEvent, AuditResult
from sandbox_site.validation import text_escape

logger = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
# Any constant works: it names the advisory lock that serialises sealing.
_CHAIN_LOCK_ID = 727_105_001
_SEAL_LOCK_TIMEOUT_MS = 10_000
# Rows sealed per transaction, and per call of ``audit_chain_seal`` (the rest: the next call).
_SEAL_BATCH = 500
_SEAL_MAX_ROWS = 20_000

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
            # Bounded: a sealer that cannot get the lock leaves its rows to the next one. The
            # setting is the transaction's own (the sealer's: it takes this lock and its rows'
            # only), gone at its end.
            cursor.execute("SELECT set_config('lock_timeout', %s, true)", [f"{_SEAL_LOCK_TIMEOUT_MS}ms"])
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_CHAIN_LOCK_ID])
    # SQLite: the sealer's transaction is BEGIN IMMEDIATE (settings), which already excludes
    # every other writer.


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
    """Append one audit event, unsealed: it joins the hash chain when the caller's transaction
    has committed (see the module docstring). Runs inside the caller's transaction when there
    is one, so an action that rolls back leaves no "ok" row behind; denied/failed attempts
    should be recorded outside the rolled-back transaction. Takes no lock."""
    ctx = current_context()
    if obj is not None:
        object_type = object_type or obj._meta.label_lower
        object_id = object_id or str(obj.pk)
        object_repr = object_repr or str(obj)[:200]
        if object_owner_id is None:
            object_owner_id = getattr(obj, "owner_id", None)
    actor_id = getattr(actor, "pk", None) if actor is not None and getattr(actor, "is_authenticated", False) else None
    event = AuditEvent(
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
        chain_seq=None,
        prev_hash="",
        hash="",
    )
    event.save()
    # Right away when there is no transaction. A failure is logged, not raised: the action has
    # committed, and the periodic sealer picks the row up.
    transaction.on_commit(_seal_after_commit, robust=True)
    return event


@dataclass
class _SealLater:
    pending: bool = False


_seal_later: contextvars.ContextVar[_SealLater | None] = contextvars.ContextVar("audit_seal_later", default=None)


@contextlib.contextmanager
def audit_seal_after_response() -> Iterator[_SealLater]:
    """Within the block (one HTTP request), audit rows committed are not sealed at commit;
    ``pending`` says whether the caller must call ``audit_chain_seal`` once the response is
    out (``RequestContextMiddleware`` does it when the response is closed)."""
    later = _SealLater()
    token = _seal_later.set(later)
    try:
        yield later
    finally:
        _seal_later.reset(token)


class _Sealer:
    """The web process's sealer: one thread that seals what responses left pending, a moment
    (``SANDBOX_AUDIT_SEAL_DELAY_SECONDS``) after the first of them, so that the requests of that
    moment share one sealing transaction instead of each running its own after its response.
    Started on first use (again in a forked child); a failure is logged and the next wake-up
    or the periodic sealer retries."""

    def __init__(self) -> None:
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def request(self) -> None:
        self._wake.set()
        with self._lock:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="audit-sealer", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            if not self._wake.wait(timeout=60):  # idle: look again (a bounded wait, nothing to do)
                continue
            time.sleep(settings.SANDBOX_AUDIT_SEAL_DELAY_SECONDS)  # let the moment's other rows join in
            # Cleared before sealing: a row committed from here on sets it again (after its
            # commit), so it is sealed by this pass or the next, never left for the periodic one.
            self._wake.clear()
            try:
                audit_chain_seal()
            except Exception:
                logger.exception("sealing audit rows after responses failed; the periodic sealer retries")
            finally:
                connection.close()  # this thread's connection: back to the pool, or closed


_sealer = _Sealer()


def audit_seal_soon() -> None:
    """Seal the rows a response left pending (``audit_seal_after_response``): with
    ``SANDBOX_AUDIT_SEAL_DELAY_SECONDS`` > 0 by the process's sealer thread a moment later,
    together with other requests' rows; with 0 right here. Never raises: the rows are committed,
    and the periodic sealer picks up any a failure leaves."""
    if settings.SANDBOX_AUDIT_SEAL_DELAY_SECONDS > 0:
        _sealer.request()
        return
    try:
        audit_chain_seal()
    except Exception:
        logger.exception("sealing audit rows after a response failed; the periodic sealer retries")


_web_process = False


def audit_seal_by_process_sealer() -> None:
    """Called once by the web process (sandbox_site/asgi.py): rows its websocket consumers
    commit outside any request are sealed by its sealer thread too (``audit_seal_soon``), not
    in the consumers' shared database thread at each commit."""
    global _web_process
    _web_process = True


def _seal_after_commit() -> None:
    later = _seal_later.get()
    if later is not None:
        later.pending = True
        return
    if _web_process:
        audit_seal_soon()
        return
    audit_chain_seal()


def audit_chain_seal(*, max_rows: int = _SEAL_MAX_ROWS) -> int:
    """Seal committed, unsealed audit rows into the chain, in id order, in short transactions
    of their own that take the chain lock and nothing else; returns how many were sealed. Must
    not run inside another transaction that holds locks (it is called after commit and from a
    periodic task)."""
    sealed = 0
    while sealed < max_rows:
        if not AuditEvent.objects.filter(chain_seq__isnull=True).exists():  # the usual case: no lock
            break
        with transaction.atomic():
            _lock_chain()
            tail = AuditEvent.objects.filter(chain_seq__isnull=False).order_by("-chain_seq")
            seq, prev_hash = tail.values_list("chain_seq", "hash").first() or (0, GENESIS_HASH)
            batch = list(
                AuditEvent.objects.filter(chain_seq__isnull=True).order_by("id")[: min(_SEAL_BATCH, max_rows - sealed)]
            )
            for event in batch:
                seq += 1
                # The id is part of the hash so that a row cannot be swapped for a copy.
                event.hash = audit_event_hash(event, prev_hash)
                updated = AuditEvent.objects.filter(pk=event.pk, chain_seq__isnull=True).update(
                    chain_seq=seq, prev_hash=prev_hash, hash=event.hash
                )
                if updated != 1:  # deleted under us: roll the batch back, the next call redoes it
                    raise RuntimeError(f"audit event {event.pk} vanished while being sealed")
                prev_hash = event.hash
        sealed += len(batch)
        if len(batch) < _SEAL_BATCH:
            break
    return sealed


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    checked: int
    broken_id: int | None = None
    reason: str = ""
    # Committed rows not sealed into the chain yet (not covered by ``checked``).
    unsealed: int = 0


def audit_chain_verify(*, grace_seconds: float | None = None) -> ChainReport:
    """Walk the sealed rows in chain order; return the first one whose place, link or content
    does not match, or else the oldest row left unsealed for longer than ``grace_seconds``
    (default ``SANDBOX_AUDIT_SEAL_GRACE_SECONDS``)."""
    if grace_seconds is None:
        grace_seconds = settings.SANDBOX_AUDIT_SEAL_GRACE_SECONDS
    prev_hash = GENESIS_HASH
    checked = 0
    sealed = AuditEvent.objects.filter(chain_seq__isnull=False).order_by("chain_seq")
    for event in sealed.iterator(chunk_size=2000):
        if event.chain_seq != checked + 1 or event.prev_hash != prev_hash:
            return ChainReport(False, checked, event.id, "previous row is missing or was altered")
        if audit_event_hash(event, prev_hash) != event.hash:
            return ChainReport(False, checked, event.id, "row content was altered")
        prev_hash = event.hash
        checked += 1
    unsealed = AuditEvent.objects.filter(chain_seq__isnull=True)
    count = unsealed.count()
    cutoff = timezone.now() - timedelta(seconds=grace_seconds)
    stale = unsealed.filter(created_at__lt=cutoff).order_by("id")
    oldest = stale.values_list("id", flat=True).first()
    if oldest is not None:
        return ChainReport(
            False,
            checked,
            oldest,
            f"{stale.count()} row(s) not sealed into the chain within {grace_seconds:g} s"
            " (is the periodic audit sealer running?)",
            unsealed=count,
        )
    return ChainReport(True, checked, unsealed=count)
