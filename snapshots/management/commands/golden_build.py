"""Build (or rebuild) the golden snapshots of this host's templates."""

import json
import time

from django.core.management.base import BaseCommand, CommandError

from sandbox_site.errors import ApplicationError
from snapshots.golden import golden_build
from snapshots.models import GoldenSnapshot
from vms.models import Operation, Template


class Command(BaseCommand):
    help = (
        "Build the golden snapshot of each given template (default: every active template that wants one) "
        "on this host (the host's Celery worker runs the builds). --wait waits for each and prints its outcome."
    )

    def add_arguments(self, parser):
        parser.add_argument("templates", nargs="*", help="Template names (default: all that want one).")
        parser.add_argument(
            "--wait", action="store_true", help="Wait for each build (run by the host's Celery worker)."
        )
        parser.add_argument("--timeout", type=float, default=900.0, help="Seconds to wait for one build.")

    def handle(self, *args, **options):
        qs = Template.objects.filter(is_active=True).select_related("image")
        if options["templates"]:
            qs = qs.filter(name__in=options["templates"])
            missing = set(options["templates"]) - set(qs.values_list("name", flat=True))
            if missing:
                raise CommandError(f"unknown or inactive template(s): {', '.join(sorted(missing))}")
        else:
            qs = qs.filter(golden_snapshot=True, image__status="ready")
        failed = []
        for template in qs:
            try:
                golden = golden_build(template=template, actor=None, reason="manage.py golden_build")
            except ApplicationError as exc:
                failed.append(template.name)
                self.stderr.write(f"{template.name}: {exc.message}")
                continue
            if options["wait"] and golden.operation:
                self._wait(golden.operation, options["timeout"])
                golden.refresh_from_db()
            row = {"template": template.name, "status": golden.status, "operation": str(golden.operation)}
            if golden.status == GoldenSnapshot.Status.FAILED:
                row["error"] = golden.error
                failed.append(template.name)
            self.stdout.write(json.dumps(row))
        if failed:
            raise CommandError(f"golden snapshot not built for: {', '.join(failed)}")

    def _wait(self, op_id, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        done = (Operation.Status.SUCCEEDED, Operation.Status.FAILED)
        while Operation.objects.filter(pk=op_id).exclude(status__in=done).exists():
            if time.monotonic() > deadline:
                raise CommandError(f"build operation {op_id} did not finish within {timeout:.0f}s")
            time.sleep(1)
