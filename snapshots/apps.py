from django.apps import AppConfig


class SnapshotsConfig(AppConfig):
    name = "snapshots"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from snapshots import lifecycle
        from vms.operations import operation_handler_register

        operation_handler_register("snapshot", lifecycle.snapshot_take)
        operation_handler_register("restore", lifecycle.snapshot_restore_run)
        operation_handler_register("clone", lifecycle.snapshot_clone_run)
