from django.core.management.base import BaseCommand, CommandError

from accounts import services


class Command(BaseCommand):
    help = (
        "Clear every login lock and back-off of a user (from the host's console: works even when "
        "every account, the admin's included, is locked out of the web). Audited."
    )

    def add_arguments(self, parser):
        parser.add_argument("username")

    def handle(self, *args, username, **options):
        from django.contrib.auth import get_user_model

        if not get_user_model().objects.filter(username=username).exists():
            raise CommandError(f"No user {username!r}.")
        removed = services.user_unlock(username=username, actor=None)
        self.stdout.write(f"{username}: unlocked ({removed} throttle rows cleared)")
