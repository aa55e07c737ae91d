"""Log context and JSON lines, without Django (hostd uses it as it is; the Django processes
through ``sandbox_site.logs``).

Ids of what is being handled (request, user, VM, operation) live in a context variable, so
every log line emitted while handling them carries them, across ``await`` and threads started
with a copied context (asgiref, ``asyncio.to_thread``). ``log_context(request_id=..)`` sets
them for a block; ``LogContextFilter`` copies them onto each record; ``JsonFormatter`` writes
one JSON object per line (``ts``, ``level``, ``logger``, ``msg``, the ids present, ``exc``).
"""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

CONTEXT_FIELDS = ("request_id", "user", "vm_id", "operation_id", "task_id")

_ids: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("msbx_log_ids", default={})  # noqa: B039 - replaced, never mutated

# Extra sources of ids (e.g. the Django request's user); each returns ids to add.
_providers: list[Callable[[], dict[str, str]]] = []


def log_ids() -> dict[str, str]:
    """The ids of the current context (request, user, VM, operation, task), as set."""
    ids = dict(_ids.get())
    for provider in _providers:
        try:
            for key, value in provider().items():
                if value:
                    ids.setdefault(key, value)
        except Exception:  # noqa: S112 - a log line must never fail because of its context
            continue
    return ids


def log_provider_register(provider: Callable[[], dict[str, str]]) -> None:
    """Add a source of ids read at each log line (idempotent)."""
    if provider not in _providers:
        _providers.append(provider)


@contextmanager
def log_context(**ids: object) -> Iterator[dict[str, str]]:
    """Run a block with these ids added to every log line (empty values are left out)."""
    merged = {**_ids.get(), **{k: str(v) for k, v in ids.items() if v not in (None, "")}}
    token = _ids.set(merged)
    try:
        yield merged
    finally:
        _ids.reset(token)


def log_context_set(**ids: object) -> None:
    """Add ids to the current context until it ends (a request or task)."""
    _ids.set({**_ids.get(), **{k: str(v) for k, v in ids.items() if v not in (None, "")}})


def request_user_name(request: object) -> str:
    """The user of a (Django) request once authentication resolved it, without resolving it
    (no database query: a log line may be emitted anywhere, also on an event loop)."""
    user = getattr(request, "__dict__", {}).get("user")
    if user is None:
        return ""
    wrapped = getattr(user, "_wrapped", user)  # SimpleLazyObject until evaluated
    if wrapped is None or type(wrapped) is object:
        return ""
    if getattr(wrapped, "is_authenticated", False) is True:
        return str(getattr(wrapped, "username", "") or getattr(wrapped, "pk", ""))
    return ""


def request_vm_id(request: object) -> str:
    """The VM a (Django) request is about, from its resolved URL (``vm_id``, or ``id``/``pk``
    of a ``vm-*`` route); empty when it is about none."""
    match = getattr(request, "resolver_match", None)
    kwargs = getattr(match, "kwargs", None)
    if not isinstance(kwargs, dict):
        return ""
    vm = kwargs.get("vm_id")
    if vm is None and str(getattr(match, "url_name", "") or "").startswith("vm-"):
        vm = kwargs.get("id", kwargs.get("pk"))
    return str(vm)[:64] if vm is not None else ""


def _record_ids(record: logging.LogRecord) -> dict[str, str]:
    # Django logs a request's 4xx/5xx after its middleware finished, with the request in
    # ``extra``: its ids come from there.
    request = getattr(record, "request", None)
    if request is None:
        return {}
    ids = {
        "request_id": str(getattr(request, "request_id", "") or ""),
        "user": request_user_name(request),
        "vm_id": request_vm_id(request),
    }
    return {k: v for k, v in ids.items() if v}


def log_context_clear() -> None:
    """Forget every id (a pool process starting its next task)."""
    _ids.set({})


class LogContextFilter(logging.Filter):
    """Copies the context's ids onto each record (``record.request_id`` ...; ``record.ctx``
    is a short ``key=value`` text for plain formats)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = {**_record_ids(record), **log_ids()}
        for name in CONTEXT_FIELDS:
            if not hasattr(record, name):
                setattr(record, name, ids.get(name, ""))
        record.ctx = " ".join(f"{k}={v}" for k, v in ids.items()) if ids else "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg``, the
    context's ids that are set, ``process``, and ``exc`` with the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "process": record.process,
        }
        ids = {**_record_ids(record), **log_ids()}
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, "") or ids.get(name, "")
            if value:
                line[name] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        return json.dumps(line, default=str, ensure_ascii=False)


def logging_configure(*, json_lines: bool, level: str = "INFO") -> None:
    """Root logging to stderr for processes without Django (hostd run alone)."""
    handler = logging.StreamHandler()
    handler.addFilter(LogContextFilter())
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(ctx)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
