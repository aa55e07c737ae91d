from django.core.management.base import BaseCommand, CommandError

from accounts.audit import audit_chain_verify


class Command(BaseCommand):
    help = (
        "Verify the audit log's hash chain in seal order; exits non-zero at the first broken link, "
        "or when rows stay unsealed longer than SANDBOX_AUDIT_SEAL_GRACE_SECONDS."
    )

    def handle(self, *args, **options):
        report = audit_chain_verify()
        if not report.ok:
            raise CommandError(
                f"Audit chain broken at event id {report.broken_id}: {report.reason} "
                f"({report.checked} rows verified before it, {report.unsealed} not sealed yet)."
            )
        pending = f" {report.unsealed} newer event(s) not sealed yet." if report.unsealed else ""
        self.stdout.write(self.style.SUCCESS(f"Audit chain intact: {report.checked} events verified.{pending}"))
