from django.contrib.auth import get_user_model
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from networking import selectors
from networking.models import EgressMode, EgressRule, Network, Nic, PortForward, Protocol


class EgressRuleSerializer(serializers.Serializer):
    cidr = serializers.CharField(max_length=43, help_text="IPv4 or IPv6")
    # Plain strings (validated by the service): "" means any protocol / the network's policy,
    # and distinct choice sets with the same field name would collide in the OpenAPI schema.
    protocol = serializers.CharField(max_length=3, default="", allow_blank=True, help_text="tcp, udp or empty (any)")
    ports = serializers.CharField(max_length=200, default="", allow_blank=True)


class NetworkSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(
        source="owner.username", read_only=True, default=None, allow_null=True, help_text="null: a shared network"
    )
    egress_rules = serializers.SerializerMethodField()

    class Meta:
        model = Network
        fields = [
            "id",
            "name",
            "owner",
            "cidr",
            "gateway",
            "cidr6",
            "gateway6",
            "bridge",
            "tenant_isolation",
            "egress_mode",
            "egress_rules",
            "is_default",
            "user_created",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields

    @extend_schema_field(EgressRuleSerializer(many=True))
    def get_egress_rules(self, obj) -> list[dict]:
        # Lists prefetch ``egress_rules`` (networking.selectors.network_list_visible).
        return [{"cidr": r.cidr, "protocol": r.protocol, "ports": r.ports} for r in obj.egress_rules.all()]


class NetworkCreateSerializer(serializers.Serializer):
    name = serializers.SlugField(max_length=63)
    cidr = serializers.CharField(
        max_length=18, required=False, help_text="Operators: required. Users: inside the user pool; omitted: picked."
    )
    gateway = serializers.IPAddressField(protocol="IPv4", required=False)
    cidr6 = serializers.CharField(
        max_length=43,
        required=False,
        allow_blank=True,
        help_text="Dual-stack: an IPv6 prefix /64-/120 (users: inside the user IPv6 pool).",
    )
    owner = serializers.SlugRelatedField(
        slug_field="username",
        queryset=get_user_model().objects.filter(is_active=True),
        required=False,
        allow_null=True,
    )
    tenant_isolation = serializers.BooleanField(default=True)
    egress_mode = serializers.ChoiceField(
        choices=EgressMode.choices,
        required=False,
        help_text="Default: allow (operators), the operator's uplink policy (users: theirs can only narrow it).",
    )
    egress_rules = EgressRuleSerializer(many=True, required=False)


class NetworkUpdateSerializer(serializers.Serializer):
    name = serializers.SlugField(max_length=63, required=False)
    tenant_isolation = serializers.BooleanField(required=False)
    egress_mode = serializers.ChoiceField(choices=EgressMode.choices, required=False)
    egress_rules = EgressRuleSerializer(many=True, required=False)


class NicSerializer(serializers.ModelSerializer):
    network = serializers.CharField(source="network.name", read_only=True)
    gateway = serializers.CharField(source="network.gateway", read_only=True)
    prefix = serializers.IntegerField(source="network.ip_network.prefixlen", read_only=True)
    gateway6 = serializers.CharField(source="network.gateway6", read_only=True, allow_null=True)
    # Not the model's choices: "" means "the network's" and is not in that enum.
    egress_mode = serializers.CharField(read_only=True, help_text="allow, deny, allowlist or empty (the network's)")
    egress_rules = serializers.SerializerMethodField()

    class Meta:
        model = Nic
        fields = [
            "id",
            "index",
            "network",
            "mac",
            "ip",
            "prefix",
            "gateway",
            "ip6",
            "gateway6",
            "tap",
            "egress_mode",
            "egress_rules",
        ]
        read_only_fields = fields

    @extend_schema_field(EgressRuleSerializer(many=True))
    def get_egress_rules(self, obj) -> list[dict]:
        return [
            {"cidr": r.cidr, "protocol": r.protocol, "ports": r.ports} for r in EgressRule.objects.filter(vm=obj.vm_id)
        ]


class NicAddSerializer(serializers.Serializer):
    network = serializers.CharField(max_length=63, help_text="A network's name or id.")
    ip = serializers.IPAddressField(
        protocol="IPv4", required=False, help_text="A free host address of the network's range (default: the lowest)."
    )
    ip6 = serializers.IPAddressField(
        protocol="IPv6", required=False, help_text="Dual-stack networks: a free address of the IPv6 prefix."
    )


class NicAddedSerializer(NicSerializer):
    """A NIC just added; ``operation``: the hot-plug operation of a running VM (null: stopped VM)."""

    operation = serializers.UUIDField(read_only=True, allow_null=True)

    class Meta(NicSerializer.Meta):
        fields = [*NicSerializer.Meta.fields, "operation"]
        read_only_fields = fields


class VmEgressSerializer(serializers.Serializer):
    mode = serializers.CharField(
        max_length=16, allow_blank=True, help_text="allow, deny, allowlist or empty (network's)"
    )
    rules = EgressRuleSerializer(many=True, required=False)


class VmEgressResultSerializer(serializers.Serializer):
    """What ``PUT /vms/{id}/egress/`` answers: the VM's egress as now set."""

    mode = serializers.CharField(help_text="allow, deny, allowlist or empty (the network's)")
    rules = EgressRuleSerializer(many=True)


class PortForwardSerializer(serializers.ModelSerializer):
    host = serializers.CharField(source="host.name", read_only=True)
    address = serializers.SerializerMethodField()

    class Meta:
        model = PortForward
        fields = ["id", "protocol", "host", "host_port", "guest_port", "address", "created_at"]
        read_only_fields = fields

    def get_address(self, obj) -> str:
        return selectors.port_forward_address(obj)


class PortForwardCreateSerializer(serializers.Serializer):
    protocol = serializers.ChoiceField(choices=Protocol.choices, default=Protocol.TCP)
    guest_port = serializers.IntegerField(min_value=1, max_value=65535)
    host_port = serializers.IntegerField(min_value=1, max_value=65535, required=False)
