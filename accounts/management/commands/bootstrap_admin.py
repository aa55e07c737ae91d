import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from accounts.models import Role
from accounts.services import user_set_role


class Command(BaseCommand):
    help = "Create the first admin if no admin exists, printing its credentials once."

    def add_arguments(self, parser):
        parser.add_argument("--username", default="admin")

    def handle(self, *args, username, **options):
        User = get_user_model()
        if User.objects.filter(is_superuser=True).exists():
            self.stdout.write("An admin exists already; credentials were printed when it was created.")
            return
        password = secrets.token_urlsafe(12)
        user = User.objects.create_user(username=username, password=password)
        user_set_role(user=user, role=Role.ADMIN, actor=None)
        self.stdout.write(
            self.style.SUCCESS(
                f"First admin created.\n  username: {username}\n  password: {password}\n"
                "(shown once; change it after logging in)"
            )
        )
