from django.apps import AppConfig


class SnapshotsConfig(AppConfig):
    name = "snapshots"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from snapshots import golden, lifecycle, pool, services
        from vms.hooks import hook_register
        from vms.operations import operation_handler_register

        operation_handler_register("snapshot", lifecycle.snapshot_take)
        operation_handler_register("restore", lifecycle.snapshot_restore_run)
        operation_handler_register("clone", lifecycle.snapshot_clone_run)
        operation_handler_register("golden_build", lifecycle.golden_build_run)
        operation_handler_register("pool_take", lifecycle.pool_take_run)
        hook_register("vm_create_source", golden.golden_create_source)
        hook_register("vm_pool_take", pool.pool_vm_take)
        hook_register("host_golden_holders", golden.golden_holders)
        hook_register("vm_move_check", services.snapshots_move_check)
        hook_register("vm_migrate_check", services.snapshots_migrate_check)
        hook_register("vm_move_files", services.snapshots_move_files)
        hook_register("vm_host_changed", services.snapshots_host_changed)
        hook_register("vm_move_layers", services.snapshots_move_layers)
