"""Rows that every API request reads (its token and user, the VM in its URL), in plain SQL.

Compiling these small queries through the ORM cost the web process more CPU than PostgreSQL
spent answering them (issue 15: about a tenth of an exec's CPU each). Here the column list of
a model is built once per process from its metadata, and each row becomes an instance the way
a queryset makes one: ``Model.from_db`` with every concrete field in order, after the database
converters Django's compiler would apply. Callers format in only what ``columns`` returns and
table names from model metadata; every value is a parameter. The converters are looked up once
per process (the same for every connection of the one PostgreSQL database).
"""

from __future__ import annotations

import functools
from typing import Any

from django.core.exceptions import ValidationError
from django.db import connection
from django.db.models import Model


@functools.cache
def _shape(model: type[Model], alias: str) -> tuple[str, tuple[str, ...], tuple[tuple[int, tuple], ...]]:
    fields = model._meta.concrete_fields
    sql = ", ".join(f'{alias}."{field.column}"' for field in fields)
    converters = []
    for index, field in enumerate(fields):
        column = field.get_col(alias)
        found = connection.ops.get_db_converters(column) + column.get_db_converters(connection)
        if found:
            converters.append((index, (column, tuple(found))))
    return sql, tuple(field.attname for field in fields), tuple(converters)


def columns(model: type[Model], alias: str) -> str:
    """Every concrete column of ``model`` as ``alias."column"``, in field order."""
    return _shape(model, alias)[0]


def width(model: type[Model]) -> int:
    return len(model._meta.concrete_fields)


def instance(model: type[Model], alias: str, row: tuple | list, start: int = 0) -> Any:
    """The ``model`` instance in ``row[start:start + width(model)]`` (selected with ``columns``)."""
    _, attnames, converters = _shape(model, alias)
    values = list(row[start : start + len(attnames)])
    for index, (column, found) in converters:
        value = values[index]
        for converter in found:
            value = converter(value, column, connection)
        values[index] = value
    return model.from_db(connection.alias, attnames, values)


def pk_param(model: type[Model], value: Any) -> Any:
    """``value`` as ``model``'s primary key is stored (SQLite keeps UUIDs as bare hex, the
    embedded default; PostgreSQL as uuid), for a plain-SQL parameter; None when malformed."""
    field = model._meta.pk
    try:
        return field.get_db_prep_value(field.to_python(value), connection)
    except (ValidationError, ValueError, TypeError):
        return None


def first_row(sql: str, params: list) -> tuple | None:
    """The first row ``sql`` returns (None when it returns none)."""
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()
