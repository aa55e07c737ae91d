from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from vms import services


class Command(BaseCommand):
    help = "Build (or reuse from cache) the default Linux guest image and mark it ready."

    def add_arguments(self, parser):
        parser.add_argument(
            "--uefi",
            action="store_true",
            help="also build the UEFI image (GPT disk, GRUB, booted by firmware) as image and template linux-uefi",
        )

    def handle(self, *args, **options):
        progress = lambda line: self.stdout.write(f"  {line}")  # noqa: E731
        try:
            image = services.image_build_default(progress=progress)
            if options["uefi"]:
                uefi = services.image_build_uefi(progress=progress)
                self.stdout.write(self.style.SUCCESS(f"Image {uefi.name} ready ({uefi.digest[:12]})."))
        except Exception as exc:
            raise CommandError(f"Image build failed: {getattr(exc, 'message', exc)}") from exc
        self.stdout.write(
            self.style.SUCCESS(f"Image {image.name} ready ({image.digest[:12]}) in {settings.SANDBOX_IMAGE_DIR}.")
        )
