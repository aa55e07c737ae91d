"""Who is acting, from where: set per request (middleware, token auth) or per task, read by audit."""

from __future__ import annotations

import contextvars
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ActorContext:
    request_id: str = ""  # generated here, never taken from the client
    client_request_id: str = ""  # a client's X-Request-ID, kept apart and labelled as such
    source_ip: str | None = None
    token_id: uuid.UUID | None = None
    # The project an API token is limited to: the request sees and acts only within it.
    token_project_id: uuid.UUID | None = None


_current: contextvars.ContextVar[ActorContext] = contextvars.ContextVar("actor_context", default=ActorContext())  # noqa: B039 - frozen dataclass, immutable


def current_context() -> ActorContext:
    return _current.get()


def new_request_id() -> str:
    return uuid.uuid4().hex


@contextmanager
def actor_context(**values: object) -> Iterator[ActorContext]:
    """Run a block with the given request id / source ip / token id (e.g. inside a Celery task)."""
    token = _current.set(replace(_current.get(), **values))  # type: ignore[arg-type]
    try:
        yield _current.get()
    finally:
        _current.reset(token)


def set_token_id(token_id: uuid.UUID, project_id: uuid.UUID | None = None) -> None:
    _current.set(replace(_current.get(), token_id=token_id, token_project_id=project_id))
