"""List pages rendered from ``.values()`` rows instead of model instances.

A ModelSerializer over 50 model instances spends most of its time building the instances
(and their ``select_related`` neighbours) and walking DRF's per-field attribute lookups. The
hot list endpoints (VMs, operations, audit events) instead read the page as ``.values()``
dicts and render each with ``RowRenderer``, which applies **the serializer's own field
objects** (``to_representation`` of each declared field, ``None`` stays ``None``), so the JSON
is the one the serializer, the OpenAPI schema and the docs describe. The serializer stays the
single description of the output: a field added to it is rendered here too, or — when its
source is not a plain column or ``a.b`` relation path — the renderer refuses to build (see
``RowRenderer.__init__``). tests/web/test_api_rows.py compares both renderings row by row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from django.conf import settings
from django.utils import timezone
from rest_framework import ISO_8601, serializers
from rest_framework.settings import api_settings

Row = dict[str, Any]


class RowRenderer:
    """Renders ``.values(*renderer.values)`` rows exactly as ``serializer_class`` renders the
    instances they come from.

    ``keys`` maps a field name to the values() key holding its value when that is not the
    field's ``source`` with ``.`` turned into ``__`` (e.g. an annotation for a property);
    ``computed`` maps a field name (a SerializerMethodField) to a function of the row, and
    ``extra_values`` names the further values() keys those functions read."""

    def __init__(
        self,
        serializer_class: type[serializers.Serializer],
        *,
        keys: dict[str, str] | None = None,
        computed: dict[str, Callable[[Row], Any]] | None = None,
        extra_values: tuple[str, ...] = (),
    ) -> None:
        keys = keys or {}
        computed = computed or {}
        self._plan: list[tuple[str, str | None, Callable[[Any], Any]]] = []
        fields = serializer_class().fields
        for name, field in fields.items():
            if field.write_only:
                continue
            if name in computed:
                self._plan.append((name, None, computed[name]))
                continue
            if isinstance(field, (serializers.SerializerMethodField, serializers.BaseSerializer)):
                raise TypeError(f"{serializer_class.__name__}.{name} needs a row function (computed=)")
            if field.source == "*":
                raise TypeError(f"{serializer_class.__name__}.{name} reads the whole object: not from a row")
            self._plan.append((name, keys.get(name, field.source.replace(".", "__")), field.to_representation))
        # Plain ISO 8601 date-time fields (no format or zone of their own), by name: _plan_for_page.
        self._iso_fields = {
            name: fields[name]
            for name, key, _ in self._plan
            if key is not None
            and type(fields[name]) is serializers.DateTimeField
            and not hasattr(fields[name], "timezone")
            and str(getattr(fields[name], "format", api_settings.DATETIME_FORMAT)).lower() == ISO_8601
        }
        plain = tuple(key for _, key, _ in self._plan if key is not None)
        self.values: tuple[str, ...] = plain + tuple(k for k in extra_values if k not in plain)

    def render(self, row: Row) -> dict[str, Any]:
        return self.render_many((row,))[0]

    def render_many(self, rows: Iterable[Row]) -> list[dict[str, Any]]:
        plan = self._plan_for_page()
        out = []
        for row in rows:
            rendered: dict[str, Any] = {}
            for name, key, represent in plan:
                if key is None:
                    rendered[name] = represent(row)
                else:
                    value = row[key]
                    rendered[name] = None if value is None else represent(value)
            out.append(rendered)
        return out

    def _plan_for_page(self) -> list[tuple[str, str | None, Callable[[Any], Any]]]:
        """The plan with ISO 8601 date-times written directly: DRF's ``DateTimeField`` looks
        up the current time zone (a context-local read) for every value; a page reads it once.
        Same text: the value in that zone, ``isoformat()``, ``+00:00`` written ``Z``; anything
        else (naive values, overflows) goes through the field."""
        zone = timezone.get_current_timezone() if settings.USE_TZ else None
        if zone is None:
            return self._plan
        return [
            (name, key, _iso_in(zone, self._iso_fields[name]) if name in self._iso_fields else represent)
            for name, key, represent in self._plan
        ]


def _iso_in(zone, field: serializers.DateTimeField) -> Callable[[Any], Any]:
    def represent(value: Any) -> Any:
        if isinstance(value, datetime) and value.utcoffset() is not None:
            try:
                text = value.astimezone(zone).isoformat()
            except OverflowError:
                return field.to_representation(value)
            return text[:-6] + "Z" if text.endswith("+00:00") else text
        return field.to_representation(value)

    return represent


class InstanceRenderer:
    """Renders one model instance exactly as ``serializer_class(instance).data`` does, with one
    serializer built once per process: a ModelSerializer builds its fields from the model on
    every instantiation, which was a fifth of a VM detail request's CPU. Like ``RowRenderer``,
    only for serializers whose output depends on the instance alone (no request context)."""

    def __init__(self, serializer_class: type[serializers.Serializer]) -> None:
        self._serializer = serializer_class()
        self._serializer.fields  # noqa: B018 - built here, once, not on a request's first call

    def render(self, instance: Any) -> dict[str, Any]:
        return self._serializer.to_representation(instance)
