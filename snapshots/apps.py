from django.apps import AppConfig


class SnapshotsConfig(AppConfig):
    name = "snapshots"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from snapshots import golden, lifecycle
        from vms.hooks import hook_register
        from vms.operations import operation_handler_register

        operation_handler_register("snapshot", lifecycle.snapshot_take)
        operation_handler_register("restore", lifecycle.snapshot_restore_run)
        operation_handler_register("clone", lifecycle.snapshot_clone_run)
        operation_handler_register("golden_build", lifecycle.golden_build_run)
        hook_register("vm_create_source", golden.golden_create_source)
