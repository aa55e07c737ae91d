from django.apps import AppConfig


class SnapshotsConfig(AppConfig):
    name = "snapshots"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from snapshots import lifecycle
        from vms.lifecycle import register_operation_handler

        register_operation_handler("snapshot", lifecycle.snapshot_take)
        register_operation_handler("restore", lifecycle.snapshot_restore_run)
        register_operation_handler("clone", lifecycle.snapshot_clone_run)
