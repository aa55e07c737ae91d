from django.contrib import admin
from guardian.admin import GuardedModelAdmin

from vms.models import VM, Host, Image, Operation, Template


@admin.register(Image)
class ImageAdmin(admin.ModelAdmin):
    list_display = ["name", "os_type", "status", "digest", "size_bytes", "updated_at"]
    list_filter = ["status", "os_type"]
    search_fields = ["name", "digest"]


@admin.register(Template)
class TemplateAdmin(admin.ModelAdmin):
    list_display = ["name", "image", "vcpus", "memory_mib", "disk_gib", "max_vcpus", "max_memory_mib", "is_active"]
    list_filter = ["is_active", "image"]
    search_fields = ["name", "description"]


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    list_display = ["name", "is_active", "driver", "acceleration", "last_seen_at"]
    list_filter = ["is_active"]
    search_fields = ["name"]


@admin.register(VM)
class VmAdmin(GuardedModelAdmin):
    """Object permissions (sharing) are edited from the "Object permissions" button."""

    list_display = ["name", "owner", "state", "template", "host", "vcpus", "memory_mib", "driver", "created_at"]
    list_filter = ["state", "driver", "template", "host"]
    search_fields = ["name", "id", "owner__username"]
    readonly_fields = [
        "id",
        "state",
        "driver",
        "acceleration",
        "vmm_pid",
        "started_at",
        "last_error",
        "last_console",
        "created_at",
    ]

    def has_add_permission(self, request):
        return False  # VMs are created through the API/dashboard so the lifecycle runs


@admin.register(Operation)
class OperationAdmin(admin.ModelAdmin):
    list_display = ["created_at", "action", "vm_ref", "status", "progress", "requested_by"]
    list_filter = ["status", "action"]
    search_fields = ["vm_ref", "request_id", "error"]
    readonly_fields = [f.name for f in Operation._meta.fields]

    def has_add_permission(self, request):
        return False
