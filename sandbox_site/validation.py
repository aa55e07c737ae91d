"""One validation layer for what arrives from outside: request bodies, query strings, path
parameters and websocket frames (docs/api.md, "What is validated").

- Text is valid UTF-8 without NUL: no lone surrogate (``"\\ud800"`` in JSON) and no ``\\x00``
  reaches a service, the database or the audit log. ``text_escape`` makes text from elsewhere
  (a guest, an exception) storable the same way.
- JSON (``json_loads_checked``) is at most ``MAX_JSON_DEPTH`` deep, has no NaN/Infinity and only
  checked text; a nesting too deep for the parser is the same 400, never a RecursionError.
- Numbers are ASCII digits (``int("²")`` and Arabic-Indic digits are refused) within bounds.
- Dates are ISO 8601 that fit the database (``0001-01-01T00:00:00+14:00`` is out of range).

Every refusal is an ``ApplicationError`` (400, code ``invalid``) with the field in ``details``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from typing import Any

from django.utils import timezone
from django.utils.dateparse import parse_datetime

from sandbox_site.errors import ApplicationError

MAX_JSON_DEPTH = 32
# Any length Python converts quickly (int() refuses beyond 4300 digits).
_ASCII_INT = re.compile(r"^[+-]?[0-9]{1,4000}$", re.ASCII)
_SURROGATE_OR_NUL = re.compile("[\ud800-\udfff\x00]")
# Earliest and latest instants every database here stores (a day inside datetime's range, so a
# +14:00 or -12:00 offset never overflows while it is converted to UTC).
_MIN_TIME = dt.datetime(1, 1, 2, tzinfo=dt.UTC)
_MAX_TIME = dt.datetime(9999, 12, 30, tzinfo=dt.UTC)


def invalid(field: str, message: str) -> ApplicationError:
    return ApplicationError(message, code="invalid", details={field: message})


def text_problem(value: str) -> str | None:
    """Why ``value`` may not be stored, or None: NUL, or a lone surrogate (not UTF-8)."""
    found = _SURROGATE_OR_NUL.search(value)
    if found is None:
        return None
    return "contains a NUL character" if found.group() == "\x00" else "is not valid UTF-8 (lone surrogate)"


def text_checked(value: str, field: str, *, max_length: int | None = None) -> str:
    problem = text_problem(value)
    if problem:
        raise invalid(field, f"{field} {problem}.")
    if max_length is not None and len(value) > max_length:
        raise invalid(field, f"{field} is longer than {max_length} characters.")
    return value


def text_escape(value: Any) -> Any:
    """``value`` (str, or JSON-like containers of them) with NUL and lone surrogates replaced by
    U+FFFD: what may be stored (PostgreSQL refuses both in text and jsonb) and always renders."""
    if isinstance(value, str):
        return _SURROGATE_OR_NUL.sub("\ufffd", value) if _SURROGATE_OR_NUL.search(value) else value
    if isinstance(value, dict):
        return {text_escape(k): text_escape(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [text_escape(v) for v in value]
    return value


def int_checked(raw: Any, field: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer from a query string or a frame: ASCII digits only, within bounds."""
    if isinstance(raw, bool):
        raise invalid(field, f"{field} must be an integer.")
    if isinstance(raw, int):
        value = raw
    elif isinstance(raw, str) and _ASCII_INT.match(raw.strip()):
        value = int(raw.strip())
    else:
        raise invalid(field, f"{field} must be an integer.")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise invalid(field, f"{field} must be between {minimum} and {maximum}.")
    return value


def datetime_checked(raw: str, field: str) -> dt.datetime:
    """An ISO 8601 date-time (naive means UTC) within what the database stores."""
    try:
        parsed = parse_datetime(raw)
        if parsed is None:
            raise ValueError(raw)
        if timezone.is_naive(parsed):
            parsed = parsed.replace(tzinfo=dt.UTC)
        if not _MIN_TIME <= parsed <= _MAX_TIME:
            raise ValueError(raw)
    except (ValueError, OverflowError) as exc:
        message = f"{field} must be an ISO 8601 date-time, like 2026-01-31T12:00:00Z."
        raise ApplicationError(message, code="invalid", details={field: text_escape(raw[:64])}) from exc
    return parsed


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400
        raise ValueError("number out of range")
    return value


def json_loads_checked(raw: bytes | str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON from outside: UTF-8, at most ``max_depth`` levels, no NaN/Infinity, text
    checked by ``text_problem`` (keys too). Raises ``ApplicationError`` (400, ``parse_error``)."""

    def refuse(message: str) -> ApplicationError:
        return ApplicationError(message, code="parse_error")

    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise refuse("The body is not valid UTF-8.") from exc
    try:
        value = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError as exc:
        raise refuse(f"JSON is nested deeper than {max_depth} levels.") from exc
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity
        raise refuse("The body is not valid JSON.") from exc
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if text_problem(item):
                raise refuse(f"JSON text {text_problem(item)}.")
        elif isinstance(item, (dict, list)):
            if depth > max_depth:
                raise refuse(f"JSON is nested deeper than {max_depth} levels.")
            if isinstance(item, dict):
                stack.extend((k, depth) for k in item)
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)
    return value


# A websocket control frame is small JSON (daphne already refuses messages over 1 MiB).
MAX_WS_CONTROL_BYTES = 64 << 10


def ws_control_frame(text: str | None) -> dict:
    """A client's JSON control frame (text) for a websocket consumer: a JSON object within
    MAX_WS_CONTROL_BYTES that passes ``json_loads_checked``. Raises ``ApplicationError``
    (``bad_request``), which the consumer answers with an ``error`` frame."""
    if text is None:
        raise ApplicationError("Binary frames are not accepted here; send JSON text.", code="bad_request")
    if len(text) > MAX_WS_CONTROL_BYTES:
        raise ApplicationError(f"Control frames are limited to {MAX_WS_CONTROL_BYTES} bytes.", code="bad_request")
    try:
        message = json_loads_checked(text)
    except ApplicationError as exc:
        raise ApplicationError(exc.message, code="bad_request") from exc
    if not isinstance(message, dict):
        raise ApplicationError("Control frames are JSON objects.", code="bad_request")
    return message
