"""``manage.py audit_export``: the audit log as JSON lines, for a SIEM (docs/operations.md).

    manage.py audit_export --since 24h                 # the last day, to stdout
    manage.py audit_export --since 2026-11-01T00:00Z --until 2026-12-01T00:00Z -o nov.jsonl
    manage.py audit_export --after-seq 41234           # incremental: events after the last one shipped

One object per line in chain (seal) order, with every column including the hash chain
(``chain_seq``, ``prev_hash``, ``hash``: ``audit_verify`` checks it), so a shipper can resume from
the last ``chain_seq`` it sent. Only sealed events are exported: a row joins the chain moments
after its transaction commits (accounts/audit.py), and is exported by the next run; how many
were left for later is said on standard error. ``--after-id`` is not a resume point: ids are
taken when a transaction writes its row, and a transaction that commits later is sealed later.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, timedelta

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from accounts.models import AuditEvent

FIELDS = (
    "id", "created_at", "actor_id", "actor_username", "token_id", "source_ip", "request_id", "action", "object_type",
    "client_request_id", "object_id", "object_repr", "object_owner_id", "before", "after", "result", "message",
    "chain_seq", "prev_hash", "hash",
)  # fmt: skip

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_when(text: str):
    """An ISO 8601 time (UTC when no zone is given) or a duration back from now (``90m``, ``7d``)."""
    match = _DURATION.match(text.strip())
    if match:
        return timezone.now() - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    when = parse_datetime(text.strip().replace("Z", "+00:00"))
    if when is None:
        raise CommandError(f"not a time or duration: {text!r} (use ISO 8601 or e.g. 24h, 7d)")
    if timezone.is_naive(when):
        when = timezone.make_aware(when, UTC)
    return when


class Command(BaseCommand):
    help = "Export sealed audit events as JSON lines (one event per line, in chain order) for a SIEM."

    def add_arguments(self, parser):
        parser.add_argument("--since", help="ISO 8601 time or a duration back from now (24h, 7d)")
        parser.add_argument("--until", help="ISO 8601 time or duration; events before it")
        parser.add_argument("--after-seq", type=int, default=None, help="only events with a larger chain_seq (resume)")
        parser.add_argument("--after-id", type=int, default=None, help="only events with a larger id")
        parser.add_argument("-o", "--output", default="-", help="file to write (default: standard output)")

    def handle(self, *args, since=None, until=None, after_seq=None, after_id=None, output="-", **options):
        qs = AuditEvent.objects.filter(chain_seq__isnull=False).order_by("chain_seq")
        if after_seq is not None:
            qs = qs.filter(chain_seq__gt=after_seq)
        if since:
            qs = qs.filter(created_at__gte=parse_when(since))
        if until:
            qs = qs.filter(created_at__lt=parse_when(until))
        if after_id is not None:
            qs = qs.filter(id__gt=after_id)
        out = self.stdout if output == "-" else open(output, "w", encoding="utf-8")  # noqa: SIM115
        count = 0
        try:
            for row in qs.values(*FIELDS).iterator(chunk_size=1000):
                line = json.dumps(row, default=str, ensure_ascii=False)
                if out is self.stdout:
                    out.write(line)  # OutputWrapper adds the line end
                else:
                    out.write(line + "\n")
                count += 1
        finally:
            if out is not self.stdout:
                out.close()
        unsealed = AuditEvent.objects.filter(chain_seq__isnull=True).count()
        later = f", {unsealed} not sealed yet (exported once sealed)" if unsealed else ""
        self.stderr.write(f"{count} audit event(s) exported{later}")
