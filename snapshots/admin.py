from django.contrib import admin, messages

from sandbox_site.errors import ApplicationError
from snapshots.golden import golden_build
from snapshots.models import GoldenSnapshot, RetentionPolicy, Snapshot, VmLineage
from vms.admin import TemplateAdmin


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


@admin.register(GoldenSnapshot)
class GoldenSnapshotAdmin(admin.ModelAdmin):
    """Golden snapshots per template and host; "Rebuild" enqueues a build on the host."""

    list_display = ["template", "host", "status", "image_version", "built_at", "size", "checksum", "error"]
    list_filter = ["status", "host", "template"]
    readonly_fields = [
        "template", "host", "snapshot", "status", "image_version", "inputs", "operation", "error", "built_at",
        "requested_at", "directory", "checksum",
    ]  # fmt: skip
    actions = ["rebuild_selected"]

    def has_add_permission(self, request):
        return False  # built from a template (its admin action, manage.py golden_build, or beat)

    @admin.display(description="directory")
    def directory(self, obj):
        return obj.snapshot.directory if obj.snapshot_id else ""

    @admin.display(description="manifest sha256")
    def checksum(self, obj):
        return obj.snapshot.checksum if obj.snapshot_id else ""

    @admin.display(description="size (MiB)")
    def size(self, obj):
        return obj.snapshot.size_bytes >> 20 if obj.snapshot_id else ""

    @admin.action(description="Rebuild the selected golden snapshots")
    def rebuild_selected(self, request, queryset):
        for golden in queryset.select_related("template", "host"):
            try:
                golden_build(template=golden.template, host=golden.host, actor=request.user, reason="admin rebuild")
            except ApplicationError as exc:
                self.message_user(request, f"{golden.template.name}: {exc.message}", level=messages.ERROR)
            else:
                self.message_user(request, f"{golden.template.name}: golden snapshot build requested")


@admin.action(description="Build the golden snapshot of the selected templates on this host")
def template_golden_build(modeladmin, request, queryset):
    for template in queryset:
        try:
            golden_build(template=template, actor=request.user, reason="admin")
        except ApplicationError as exc:
            modeladmin.message_user(request, f"{template.name}: {exc.message}", level=messages.ERROR)
        else:
            modeladmin.message_user(request, f"{template.name}: golden snapshot build requested")


TemplateAdmin.actions = [*(TemplateAdmin.actions or []), template_golden_build]
