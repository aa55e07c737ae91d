"""Check the files of every ready snapshot against its integrity manifest."""

import json

from django.core.management.base import BaseCommand, CommandError

from snapshots.lifecycle import snapshots_verify_all


class Command(BaseCommand):
    help = "Verify the sha256 of every file of every ready snapshot (exit status 1 when one is bad)."

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
        parser.add_argument("--this-host", action="store_true", help="Only snapshots held by this host.")

    def handle(self, *args, **options):
        host = None
        if options["this_host"]:
            from vms.services import local_host

            host = local_host()
        report = snapshots_verify_all(host=host)
        bad = [r for r in report if not r["ok"]]
        if options["json"]:
            self.stdout.write(json.dumps({"checked": len(report), "bad": bad}, indent=1))
        else:
            for row in report:
                self.stdout.write(f"{'ok ' if row['ok'] else 'BAD'} {row['name']} {row['snapshot']} {row['error']}")
            self.stdout.write(f"{len(report)} checked, {len(bad)} bad")
        if bad:
            raise CommandError(f"{len(bad)} snapshot(s) failed verification")
