from django.contrib import admin

from snapshots.models import RetentionPolicy, Snapshot, VmLineage


@admin.register(Snapshot)
class SnapshotAdmin(admin.ModelAdmin):
    list_display = ["name", "vm_name", "owner", "state", "include_memory", "size_bytes", "pause_ms", "created_at"]
    list_filter = ["state", "include_memory", "driver", "host"]
    search_fields = ["name", "vm_name", "owner__username", "checksum"]
    readonly_fields = [f.name for f in Snapshot._meta.fields]

    def has_add_permission(self, request):
        return False  # snapshots are taken through the API (the VMM must be involved)


@admin.register(RetentionPolicy)
class RetentionPolicyAdmin(admin.ModelAdmin):
    list_display = ["__str__", "vm", "user", "keep_last", "keep_days", "updated_at"]


@admin.register(VmLineage)
class VmLineageAdmin(admin.ModelAdmin):
    list_display = ["vm", "snapshot", "updated_at"]
    readonly_fields = ["vm", "snapshot", "updated_at"]
