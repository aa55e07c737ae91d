"""The API's one pagination class: ``?limit=`` is capped at SANDBOX_PAGE_MAX (a caller cannot
ask one request to serialise a whole table)."""

from __future__ import annotations

from django.conf import settings
from rest_framework.pagination import LimitOffsetPagination


class ApiPagination(LimitOffsetPagination):
    @property
    def max_limit(self) -> int:  # read per request: tests and deploys change it
        return settings.SANDBOX_PAGE_MAX
