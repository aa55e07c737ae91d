"""The API's one pagination class: ``?limit=`` is capped at SANDBOX_PAGE_MAX (a caller cannot
ask one request to serialise a whole table) and both parameters are checked integers."""

from __future__ import annotations

from django.conf import settings
from rest_framework.pagination import LimitOffsetPagination

from sandbox_site.validation import int_checked

# Beyond any real table; keeps offset + limit inside a 64-bit SQL integer.
MAX_OFFSET = 1 << 40


class ApiPagination(LimitOffsetPagination):
    """``?limit=`` (at least 1; larger than SANDBOX_PAGE_MAX is answered with SANDBOX_PAGE_MAX) and
    ``?offset=`` (0..MAX_OFFSET); anything else that is not an integer is a 400."""

    @property
    def max_limit(self) -> int:  # read per request: tests and deploys change it
        return settings.SANDBOX_PAGE_MAX

    def get_limit(self, request):
        raw = request.query_params.get(self.limit_query_param)
        if raw is None or raw == "":
            return self.default_limit
        return min(int_checked(raw, "limit", minimum=1, maximum=None), self.max_limit)

    def get_schema_operation_parameters(self, view):
        bounds = {
            self.limit_query_param: {"type": "integer", "minimum": 1},
            self.offset_query_param: {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET},
        }
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            parameter["schema"] = bounds.get(parameter["name"], parameter["schema"])
        return parameters

    def get_offset(self, request):
        raw = request.query_params.get(self.offset_query_param)
        if raw is None or raw == "":
            return 0
        return int_checked(raw, "offset", minimum=0, maximum=MAX_OFFSET)


class RowsCountedBy:
    """A list's page of ``rows`` (a values() queryset, with the joins its columns read)
    counted on ``counted``: the same filter without those joins, so the same number (forward
    foreign keys only: Django joins a non-null one with INNER JOIN, a nullable one with LEFT
    OUTER JOIN, and neither adds or drops a row). The pagination's exact ``COUNT(*)`` then
    neither compiles nor runs the joins of the page (issue 15)."""

    def __init__(self, rows, counted) -> None:
        self.rows = rows
        self.counted = counted

    def count(self) -> int:
        return self.counted.count()

    def __getitem__(self, index):
        return self.rows[index]
