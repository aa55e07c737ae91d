import ipaddress
import re
import uuid

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils import timezone

from networking.netlink import bridge_name, tap_name


class EgressMode(models.TextChoices):
    ALLOW = "allow", "Allow all"
    DENY = "deny", "Deny all"
    ALLOWLIST = "allowlist", "Allow-list"


class Protocol(models.TextChoices):
    TCP = "tcp", "TCP"
    UDP = "udp", "UDP"


def validate_ipv4_cidr(value: str) -> None:
    try:
        net = ipaddress.IPv4Network(value, strict=True)
    except ValueError as exc:
        raise ValidationError(f"{value!r} is not an IPv4 network (like 10.231.0.0/24): {exc}") from exc
    if not 16 <= net.prefixlen <= 29:
        raise ValidationError("Use a prefix between /16 and /29.")


def validate_ipv6_prefix(value: str) -> None:
    try:
        net = ipaddress.IPv6Network(value, strict=True)
    except ValueError as exc:
        raise ValidationError(f"{value!r} is not an IPv6 prefix (like fd00:231::/64): {exc}") from exc
    if not 64 <= net.prefixlen <= 120:
        raise ValidationError("Use an IPv6 prefix between /64 and /120.")


_PORTS_RE = re.compile(r"^[0-9]{1,5}(-[0-9]{1,5})?(,[0-9]{1,5}(-[0-9]{1,5})?)*$", re.ASCII)


def parse_ports(text: str) -> tuple[int | tuple[int, int], ...]:
    """``"80,443,8000-8100"`` -> ``(80, 443, (8000, 8100))``; raises ValidationError."""
    text = (text or "").replace(" ", "")
    if not text:
        return ()
    if not _PORTS_RE.match(text) or text.count(",") >= 32:
        raise ValidationError(
            "Ports are a comma-separated list of ports or ranges (at most 32), like 80,443,8000-8100."
        )
    out: list[int | tuple[int, int]] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        low, high = int(lo), int(hi or lo)
        if not 1 <= low <= high <= 65535:
            raise ValidationError(f"Port range {part} is outside 1-65535 or reversed.")
        out.append(low if low == high else (low, high))
    return tuple(out)


VNI_MAX = 2**24 - 1  # VXLAN network identifiers are 24 bits; 0 is not used


def vni_pick(network_id: uuid.UUID, *, taken: set) -> int:
    """The network's VNI: 24 bits of its id, or the next free one when another network has
    it (the unique constraint backs this up against two creates racing)."""
    vni = int(network_id.hex[-6:], 16) % VNI_MAX or 1
    while vni in taken:
        vni = vni % VNI_MAX + 1
    return vni


class Network(models.Model):
    """A layer-2 network: one Linux bridge per host, a subnet, the gateway address on the
    bridge. ``owner`` empty = shared (any user may attach VMs); otherwise private to the
    owner and whoever holds ``use_network`` on it."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.SlugField(max_length=63, unique=True)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True, related_name="networks"
    )
    # Private networks belong to a project (its members may use them); empty with ``owner``.
    project = models.ForeignKey(
        "accounts.Project", on_delete=models.PROTECT, null=True, blank=True, related_name="networks"
    )
    cidr = models.CharField(max_length=18, unique=True, validators=[validate_ipv4_cidr])
    gateway = models.GenericIPAddressField(protocol="IPv4")
    cidr6 = models.CharField(
        max_length=43, blank=True, validators=[validate_ipv6_prefix], help_text="Empty: IPv4 only."
    )
    gateway6 = models.GenericIPAddressField(protocol="IPv6", null=True, blank=True)
    bridge = models.CharField(max_length=15, unique=True, blank=True, editable=False)
    vni = models.PositiveIntegerField(
        unique=True,
        null=True,
        blank=True,
        editable=False,
        help_text="VXLAN network identifier of the network's tunnels between hosts (derived from its id).",
    )
    tenant_isolation = models.BooleanField(
        default=True, help_text="VMs of different owners on this network cannot reach each other."
    )
    egress_mode = models.CharField(max_length=16, choices=EgressMode.choices, default=EgressMode.ALLOW)
    is_default = models.BooleanField(default=False)
    user_created = models.BooleanField(
        default=False,
        editable=False,
        help_text="Created by a user (not an operator): its egress never exceeds the operator's uplink "
        "policy (the default network's), even after an operator narrows that.",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(
                fields=["is_default"], condition=models.Q(is_default=True), name="network_one_default"
            ),
            models.UniqueConstraint(fields=["cidr6"], condition=~models.Q(cidr6=""), name="network_unique_cidr6"),
        ]
        permissions = [("use_network", "Attach VMs to the network")]

    def __str__(self) -> str:
        return self.name

    def save(self, *args, **kwargs):
        if not self.bridge:
            self.bridge = bridge_name(str(self.id))
        if self.vni is None:
            self.vni = vni_pick(self.id, taken=set(Network.objects.exclude(pk=self.pk).values_list("vni", flat=True)))
        if self.project_id is None and self.owner_id is not None:  # a private network: its owner's project
            from accounts.services import project_personal_ensure

            self.project = project_personal_ensure(self.owner)
        super().save(*args, **kwargs)

    @property
    def ip_network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.cidr)

    @property
    def ip_network6(self) -> ipaddress.IPv6Network | None:
        return ipaddress.IPv6Network(self.cidr6) if self.cidr6 else None

    @staticmethod
    def object_permission_codenames() -> tuple[str, ...]:
        return ("view_network", "change_network", "delete_network", "use_network")

    def clean(self) -> None:
        if not self.cidr:
            return
        validate_ipv4_cidr(self.cidr)
        net = self.ip_network
        if self.gateway and ipaddress.IPv4Address(self.gateway) not in list(net.hosts()):
            raise ValidationError({"gateway": f"must be a host address of {self.cidr}"})
        overlapping = [other.name for other in Network.objects.exclude(pk=self.pk) if other.ip_network.overlaps(net)]
        if overlapping:
            raise ValidationError({"cidr": f"overlaps network(s) {', '.join(overlapping)}"})
        if self.cidr6:
            validate_ipv6_prefix(self.cidr6)
            net6 = ipaddress.IPv6Network(self.cidr6)
            if self.gateway6 and ipaddress.IPv6Address(self.gateway6) not in net6:
                raise ValidationError({"gateway6": f"must be an address of {self.cidr6}"})
            overlapping = [
                other.name
                for other in Network.objects.exclude(pk=self.pk).exclude(cidr6="")
                if other.ip_network6 is not None and other.ip_network6.overlaps(net6)
            ]
            if overlapping:
                raise ValidationError({"cidr6": f"overlaps network(s) {', '.join(overlapping)}"})


class Nic(models.Model):
    """A VM's network interface: a TAP on its network's bridge, with a MAC and an IPv4
    address from the network's subnet (unique per network; the database enforces it)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    vm = models.ForeignKey("vms.VM", on_delete=models.CASCADE, related_name="nics")
    network = models.ForeignKey(Network, on_delete=models.PROTECT, related_name="nics")
    index = models.PositiveSmallIntegerField(default=0, help_text="eth<index> in the guest")
    mac = models.CharField(max_length=17, unique=True)
    ip = models.GenericIPAddressField(protocol="IPv4")
    ip6 = models.GenericIPAddressField(protocol="IPv6", null=True, blank=True, help_text="On a dual-stack network.")
    tap = models.CharField(max_length=15, unique=True, blank=True, editable=False)
    egress_mode = models.CharField(
        max_length=16, choices=EgressMode.choices, blank=True, help_text="Empty: the network's policy applies."
    )
    egress_widened = models.BooleanField(
        default=False,
        help_text="Set by an operator: the VM's own egress may be wider than its network's "
        "(otherwise it only narrows it).",
    )
    plumbed = models.BooleanField(default=False, help_text="Its TAP exists on the VM's host and rules include it.")
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["vm", "index"]
        constraints = [
            models.UniqueConstraint(fields=["network", "ip"], name="nic_unique_ip_per_network"),
            models.UniqueConstraint(fields=["network", "ip6"], name="nic_unique_ip6_per_network"),
            models.UniqueConstraint(fields=["vm", "index"], name="nic_unique_index_per_vm"),
        ]
        verbose_name = "NIC"

    def __str__(self) -> str:
        return f"{self.tap} {self.ip}"

    def save(self, *args, **kwargs):
        if not self.tap:
            self.tap = tap_name(str(self.id))
        super().save(*args, **kwargs)


class EgressRule(models.Model):
    """One allow-list entry of a network (``network`` set) or of one VM (``vm`` set)."""

    id = models.BigAutoField(primary_key=True)
    network = models.ForeignKey(Network, on_delete=models.CASCADE, null=True, blank=True, related_name="egress_rules")
    vm = models.ForeignKey("vms.VM", on_delete=models.CASCADE, null=True, blank=True, related_name="egress_rules")
    cidr = models.CharField(max_length=43, help_text="IPv4 or IPv6")
    protocol = models.CharField(max_length=3, choices=Protocol.choices, blank=True, help_text="Empty: any protocol.")
    ports = models.CharField(max_length=200, blank=True, help_text="e.g. 80,443,8000-8100; empty: all ports")
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(network__isnull=False, vm__isnull=True)
                | models.Q(network__isnull=True, vm__isnull=False),
                name="egressrule_network_xor_vm",
            )
        ]

    def __str__(self) -> str:
        return f"{self.protocol or 'any'} {self.cidr} {self.ports}".strip()

    def clean(self) -> None:
        try:
            ipaddress.ip_network(self.cidr, strict=False)
        except ValueError as exc:
            raise ValidationError({"cidr": str(exc)}) from exc
        try:
            parse_ports(self.ports)
        except ValidationError as exc:
            raise ValidationError({"ports": exc.messages}) from exc
        if self.ports and not self.protocol:
            raise ValidationError({"ports": "Ports need a protocol (tcp or udp)."})


class PortForward(models.Model):
    """Host port -> VM port on the VM's host. Unique per host and protocol."""

    id = models.BigAutoField(primary_key=True)
    vm = models.ForeignKey("vms.VM", on_delete=models.CASCADE, related_name="port_forwards")
    host = models.ForeignKey("vms.Host", on_delete=models.CASCADE, related_name="port_forwards")
    protocol = models.CharField(max_length=3, choices=Protocol.choices, default=Protocol.TCP)
    host_port = models.PositiveIntegerField(validators=[MinValueValidator(1), MaxValueValidator(65535)])
    guest_port = models.PositiveIntegerField(validators=[MinValueValidator(1), MaxValueValidator(65535)])
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["protocol", "host_port"]
        constraints = [
            models.UniqueConstraint(fields=["host", "protocol", "host_port"], name="portforward_unique_host_port")
        ]

    def __str__(self) -> str:
        return f"{self.protocol}/{self.host_port} -> {self.vm_id}:{self.guest_port}"
