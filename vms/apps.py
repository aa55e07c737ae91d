from django.apps import AppConfig


class VmsConfig(AppConfig):
    name = "vms"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from vms import lifecycle, migration, moves

        lifecycle.handlers_register()
        moves.handlers_register()
        migration.handlers_register()
