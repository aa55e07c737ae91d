from django.apps import AppConfig


class NetworkingConfig(AppConfig):
    name = "networking"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # vms calls these at its lifecycle points and never imports networking.
        from networking import selectors, services
        from vms.hooks import hook_register
        from vms.lifecycle import in_place_handler
        from vms.operations import operation_handler_register

        hook_register("vm_created", services.vm_hook_created)
        hook_register("vm_before_launch", services.vm_hook_before_launch)
        hook_register("vm_vmm_gone", services.vm_hook_vmm_gone)
        hook_register("vm_migrated_away", services.vm_hook_migrated_away)
        hook_register("vm_row_deleting", services.vm_hook_row_deleting)
        hook_register("vm_nics", services.vm_hook_nics)
        hook_register("vm_nics_check", services.nic_requests_resolve)
        hook_register("vm_agent_ready", services.vm_hook_agent_ready)
        hook_register("vm_counters", services.vm_hook_counters)
        hook_register("vm_addresses", selectors.addresses_of)
        hook_register("host_worker_ready", services.host_hook_worker_ready)
        hook_register("vm_owner_changed", services.vm_hook_owner_changed)
        hook_register("host_tunnel_changed", services.host_hook_tunnel_changed)
        hook_register("vm_move_check", services.vm_hook_move_check)
        hook_register("vm_host_changed", services.vm_hook_host_changed)
        operation_handler_register("nic_hotplug", in_place_handler("nic_hotplug", services.nic_hotplug_call))
