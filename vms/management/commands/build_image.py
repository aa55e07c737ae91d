from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from vms import services


class Command(BaseCommand):
    help = "Build (or reuse from cache) the default Linux guest image and mark it ready."

    def handle(self, *args, **options):
        try:
            image = services.image_build_default(progress=lambda line: self.stdout.write(f"  {line}"))
        except Exception as exc:
            raise CommandError(f"Image build failed: {getattr(exc, 'message', exc)}") from exc
        self.stdout.write(
            self.style.SUCCESS(f"Image {image.name} ready ({image.digest[:12]}) in {settings.SANDBOX_IMAGE_DIR}.")
        )
