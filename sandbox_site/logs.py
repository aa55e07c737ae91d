"""Log context for the Django processes (web, Celery worker and beat).

Every line emitted while handling a request or a task carries its ids (request, user, VM,
operation, task; ``vms.hostd.logcontext`` formats them, as JSON lines when ``LOG_FORMAT`` is
``json``, the default with ``DEBUG`` off):

- web: the request id is the one ``accounts.middleware.RequestContextMiddleware`` gives the
  request (``accounts.context``); ``ObservabilityMiddleware`` (sandbox_site.metrics) keeps the
  request so its user shows once authentication has resolved it (session or token), and the
  VM its URL names (``vm_id``).
- Celery: a task sent while handling a request carries its request id and user in the task's
  headers (``msbx_request_id``, ``msbx_user``); the worker restores them, with the task id,
  for the task's run (signals below).
- hostd: clients send the request id in each request's ``request`` field (vms/hostd/client.py).
"""

from __future__ import annotations

import contextvars
import logging

from celery import signals

from vms.hostd.logcontext import (
    log_context_clear,
    log_context_set,
    log_ids,
    log_provider_register,
    request_user_name,
    request_vm_id,
)

logger = logging.getLogger(__name__)

_request: contextvars.ContextVar[object | None] = contextvars.ContextVar("msbx_log_request", default=None)

HEADER_REQUEST_ID = "msbx_request_id"
HEADER_USER = "msbx_user"


def _django_ids() -> dict[str, str]:
    from accounts.context import current_context

    ids = {"request_id": current_context().request_id}
    request = _request.get()
    if request is not None:
        ids["user"] = request_user_name(request)
        ids["vm_id"] = request_vm_id(request)
    return ids


log_provider_register(_django_ids)


def request_bind(request) -> contextvars.Token:
    """Keep ``request`` as the current one for log lines (reset with ``request_unbind``)."""
    return _request.set(request)


def request_unbind(token: contextvars.Token) -> None:
    _request.reset(token)


@signals.before_task_publish.connect
def _task_headers_add(sender=None, headers=None, **kwargs) -> None:
    if headers is None:
        return
    ids = log_ids()
    if ids.get("request_id"):
        headers.setdefault(HEADER_REQUEST_ID, ids["request_id"])
    if ids.get("user"):
        headers.setdefault(HEADER_USER, ids["user"])


_task_exits: dict[str, object] = {}


@signals.task_prerun.connect
def _task_context_enter(task_id=None, task=None, **kwargs) -> None:
    from accounts.context import actor_context

    request = getattr(task, "request", None)
    request_id = (request.get(HEADER_REQUEST_ID) if request is not None else None) or ""
    user = (request.get(HEADER_USER) if request is not None else None) or ""
    # Celery runs prerun, the task and postrun in one thread: set the context for the run,
    # and undo it at postrun (a pool process runs many tasks).
    log_context_clear()
    log_context_set(request_id=request_id, user=user, task_id=task_id)
    if request_id:
        cm = actor_context(request_id=request_id)
        cm.__enter__()
        _task_exits[task_id] = cm


@signals.task_postrun.connect
def _task_context_exit(task_id=None, **kwargs) -> None:
    cm = _task_exits.pop(task_id, None)
    if cm is not None:
        cm.__exit__(None, None, None)  # type: ignore[attr-defined]
    log_context_clear()
