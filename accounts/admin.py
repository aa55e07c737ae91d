from django.contrib import admin

from accounts.models import ApiToken, AuditEvent, LoginThrottle, Project, ProjectMembership, ProjectQuota, UserQuota


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["name", "user", "prefix", "read_only", "created_at", "expires_at", "last_used_at", "revoked_at"]
    list_filter = ["read_only", ("revoked_at", admin.EmptyFieldListFilter), "created_at"]
    search_fields = ["name", "prefix", "user__username"]
    readonly_fields = ["id", "user", "prefix", "created_at", "last_used_at"]
    fields = ["id", "user", "name", "prefix", "read_only", "created_at", "expires_at", "last_used_at", "revoked_at"]

    def has_add_permission(self, request):
        return False  # tokens are created through the API or dashboard so the secret is shown once


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    # In chain (seal) order, like audit_verify; "-" in the chain column: not sealed yet.
    list_display = [
        "chain_seq",
        "created_at",
        "actor_username",
        "action",
        "object_type",
        "object_repr",
        "result",
        "source_ip",
    ]
    list_display_links = ["created_at"]
    list_filter = ["result", "action", "object_type", "created_at", ("chain_seq", admin.EmptyFieldListFilter)]
    search_fields = ["actor_username", "action", "object_id", "object_repr", "request_id", "message"]
    date_hierarchy = "created_at"

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in self.model._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(LoginThrottle)
class LoginThrottleAdmin(admin.ModelAdmin):
    list_display = ["username", "address", "failures", "last_failure_at", "locked_until", "next_attempt_at"]
    search_fields = ["username", "address"]
    actions = ["unlock"]

    @admin.action(description="Unlock these accounts (every address)")
    def unlock(self, request, queryset):
        from accounts.services import user_unlock

        names = sorted(set(queryset.values_list("username", flat=True)))
        for username in names:
            user_unlock(username=username, actor=request.user)
        self.message_user(request, f"Unlocked {', '.join(names)}.")


@admin.register(UserQuota)
class UserQuotaAdmin(admin.ModelAdmin):
    list_display = ["user", "max_vms", "max_vcpus", "max_memory_mib", "max_disk_gib"]
    search_fields = ["user__username"]
    autocomplete_fields = ["user"]


class ProjectMembershipInline(admin.TabularInline):
    model = ProjectMembership
    extra = 0
    autocomplete_fields = ["user"]


class ProjectQuotaInline(admin.StackedInline):
    model = ProjectQuota
    extra = 0
    max_num = 1


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    """Projects (docs/projects.md). Edits here are audited by the admin site; the API's
    services also check the rules (one owner, personal projects have one member)."""

    list_display = ["slug", "name", "personal_of", "created_at"]
    search_fields = ["slug", "name", "memberships__user__username"]
    readonly_fields = ["id", "personal_of", "created_at"]
    filter_horizontal = ["templates"]
    inlines = [ProjectMembershipInline, ProjectQuotaInline]
