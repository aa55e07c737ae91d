from django.contrib import admin
from guardian.admin import GuardedModelAdmin

from networking.models import EgressRule, Network, Nic, PortForward


class EgressRuleInline(admin.TabularInline):
    model = EgressRule
    fk_name = "network"
    extra = 0
    fields = ["cidr", "protocol", "ports"]


@admin.register(Network)
class NetworkAdmin(GuardedModelAdmin):
    """Edits here change rows only; hosts pick the change up at the next rules apply or
    reconcile. Prefer the API, which audits and re-applies the rules at once."""

    list_display = ["name", "cidr", "gateway", "bridge", "owner", "tenant_isolation", "egress_mode", "is_default"]
    list_filter = ["tenant_isolation", "egress_mode", "is_default"]
    search_fields = ["name", "cidr", "bridge"]
    readonly_fields = ["bridge", "created_at", "updated_at"]
    inlines = [EgressRuleInline]


@admin.register(Nic)
class NicAdmin(admin.ModelAdmin):
    list_display = ["tap", "vm", "network", "ip", "mac", "egress_mode", "plumbed"]
    list_filter = ["network", "plumbed"]
    search_fields = ["ip", "mac", "tap", "vm__name"]
    readonly_fields = ["tap", "vm", "network", "ip", "mac", "index", "plumbed", "created_at"]


@admin.register(PortForward)
class PortForwardAdmin(admin.ModelAdmin):
    list_display = ["host", "protocol", "host_port", "vm", "guest_port", "created_by", "created_at"]
    list_filter = ["host", "protocol"]
    search_fields = ["vm__name", "host_port"]
    readonly_fields = ["created_at"]
