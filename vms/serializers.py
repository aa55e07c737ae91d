from rest_framework import serializers

from sandbox_site.api_rows import InstanceRenderer, RowRenderer
from vms.models import VM, BootMode, DiskFormat, Image, Operation, OsType, Template, name_validator


class ImageSerializer(serializers.ModelSerializer):
    created_by = serializers.CharField(source="created_by.username", read_only=True, default=None, allow_null=True)
    deprecated = serializers.SerializerMethodField()

    class Meta:
        model = Image
        fields = [
            "id",
            "name",
            "description",
            "os_type",
            "boot_mode",
            "disk_format",
            "status",
            "source",
            "sha256",
            "size_bytes",
            "virtual_size_bytes",
            "min_disk_gib",
            "min_memory_mib",
            "is_public",
            "deprecated",
            "deprecated_at",
            "created_by",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields

    def get_deprecated(self, image: Image) -> bool:
        return image.deprecated_at is not None


class ImageCreateSerializer(serializers.Serializer):
    """Upload (multipart, ``file``) or register (``path`` under SANDBOX_IMAGE_IMPORT_DIR)."""

    name = serializers.SlugField(max_length=64)
    sha256 = serializers.CharField(max_length=64, min_length=64)
    disk_format = serializers.ChoiceField(choices=DiskFormat.choices)
    boot_mode = serializers.ChoiceField(choices=BootMode.choices, default=BootMode.UEFI)
    os_type = serializers.ChoiceField(choices=OsType.choices, default=OsType.LINUX)
    min_disk_gib = serializers.IntegerField(min_value=1, max_value=4096, default=1)
    min_memory_mib = serializers.IntegerField(min_value=64, max_value=1024 * 1024, default=256)
    description = serializers.CharField(max_length=200, required=False, default="", allow_blank=True)
    is_public = serializers.BooleanField(default=True)
    file = serializers.FileField(required=False, allow_empty_file=True)
    path = serializers.CharField(max_length=500, required=False)

    def validate(self, attrs):
        if ("file" in attrs) == ("path" in attrs):
            raise serializers.ValidationError("Give exactly one of file (upload) or path (register).")
        return attrs


class ImageUpdateSerializer(serializers.Serializer):
    description = serializers.CharField(max_length=200, required=False, allow_blank=True)
    min_disk_gib = serializers.IntegerField(min_value=1, max_value=4096, required=False)
    min_memory_mib = serializers.IntegerField(min_value=64, max_value=1024 * 1024, required=False)
    is_public = serializers.BooleanField(required=False)


class ImageDeprecateSerializer(serializers.Serializer):
    deprecated = serializers.BooleanField(default=True)


class TemplateSerializer(serializers.ModelSerializer):
    image = serializers.SlugRelatedField(slug_field="name", read_only=True)
    image_status = serializers.CharField(source="image.status", read_only=True)
    boot_mode = serializers.CharField(source="image.boot_mode", read_only=True)
    os_type = serializers.CharField(source="image.os_type", read_only=True)

    class Meta:
        model = Template
        fields = [
            "id",
            "name",
            "description",
            "image",
            "image_status",
            "boot_mode",
            "os_type",
            "vcpus",
            "max_vcpus",
            "memory_mib",
            "max_memory_mib",
            "disk_gib",
            "max_disk_gib",
            "kernel_cmdline",
            "is_active",
        ]


class VmSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", read_only=True)
    project = serializers.CharField(source="project.slug", read_only=True)
    template = serializers.CharField(source="template.name", read_only=True)
    image = serializers.CharField(source="boot_image.name", read_only=True)
    host = serializers.CharField(source="host.name", read_only=True, default=None)
    actions = serializers.SerializerMethodField(help_text="Actions the VM's state allows now (vms.transitions).")

    class Meta:
        model = VM
        fields = [
            "id",
            "name",
            "owner",
            "project",
            "template",
            "image",
            "host",
            "state",
            "actions",
            "vcpus",
            "memory_mib",
            "disk_gib",
            "metadata",
            "driver",
            "acceleration",
            "started_at",
            "last_error",
            "last_console",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields

    def get_actions(self, vm: VM) -> list[str]:
        from vms.transitions import vm_actions_allowed

        return vm_actions_allowed(vm.state)


def _vm_row_actions(row) -> list[str]:
    from vms.transitions import vm_actions_allowed

    return vm_actions_allowed(row["state"])


# The VM list's rows (vms.selectors.vm_list_rows): VmSerializer's output from values() rows.
VM_ROWS = RowRenderer(
    VmSerializer,
    keys={
        "owner": "owner_username",
        "project": "project_slug",
        "template": "template_name",
        "image": "boot_image_name",
        "host": "host_name",
    },
    computed={"actions": _vm_row_actions},
)
# A VM's detail (VmViewSet.retrieve): VmSerializer's output, its fields built once.
VM_DETAIL = InstanceRenderer(VmSerializer)


class VmCreatedSerializer(VmSerializer):
    """A VM just created (or cloned): the VM and the operation that builds it."""

    operation = serializers.UUIDField(read_only=True)

    class Meta(VmSerializer.Meta):
        fields = [*VmSerializer.Meta.fields, "operation"]
        read_only_fields = fields


class VmNicRequestSerializer(serializers.Serializer):
    """One NIC asked for at create time (checked by networking: visible, usable, free address)."""

    network = serializers.CharField(max_length=63, help_text="A network's name or id.")
    ip = serializers.IPAddressField(
        protocol="IPv4", required=False, help_text="A free host address of the network's range (default: the lowest)."
    )
    ip6 = serializers.IPAddressField(
        protocol="IPv6", required=False, help_text="Dual-stack networks: a free address of the IPv6 prefix."
    )


class VmCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=63, validators=[name_validator])
    template = serializers.SlugRelatedField(slug_field="name", queryset=Template.objects.filter(is_active=True))
    vcpus = serializers.IntegerField(min_value=1, max_value=64, required=False)
    memory_mib = serializers.IntegerField(min_value=64, max_value=1024 * 1024, required=False)
    disk_gib = serializers.IntegerField(min_value=1, max_value=4096, required=False)
    metadata = serializers.DictField(required=False)
    start = serializers.BooleanField(default=True)
    image = serializers.SlugRelatedField(
        slug_field="name",
        queryset=Image.objects.all(),
        required=False,
        help_text="Boot this image, not the template's.",
    )
    project = serializers.CharField(
        max_length=63,
        required=False,
        help_text="Id or slug of the project the VM goes into (you must be an owner or member there); "
        "default: the project your token is limited to, else your personal project.",
    )
    host = serializers.CharField(
        max_length=64, required=False, help_text="Operators: place the VM on this host (by name)."
    )
    anti_affinity = serializers.BooleanField(
        default=False, help_text="Place the VM on a host holding none of the owner's other VMs."
    )
    nics = VmNicRequestSerializer(
        many=True,
        required=False,
        max_length=8,
        min_length=1,
        help_text="The VM's NICs in guest order (default: one on the default network).",
    )


class HostImageSerializer(serializers.Serializer):
    """An image as one host holds it (``vms.inventory``)."""

    id = serializers.UUIDField(source="image.id")
    name = serializers.CharField(source="image.name")
    status = serializers.CharField(help_text="present (verified), corrupt, or unverified (no recorded SHA-256)")
    sha256 = serializers.SerializerMethodField(help_text="SHA-256 of each file here, by role")
    error = serializers.CharField()
    verified_at = serializers.DateTimeField()

    def get_sha256(self, row) -> dict[str, str]:
        return {role: entry.get("sha256", "") for role, entry in (row.files or {}).items()}


class HostSerializer(serializers.Serializer):
    """A host as placement sees it (``vms.selectors.host_list_with_usage`` rows)."""

    id = serializers.UUIDField()
    name = serializers.CharField()
    is_active = serializers.BooleanField()
    cordoned = serializers.BooleanField()
    up = serializers.BooleanField()
    driver = serializers.CharField()
    boot_modes = serializers.ListField(child=serializers.CharField(), help_text="What its driver boots.")
    acceleration = serializers.CharField()
    cpus = serializers.IntegerField()
    memory_mib = serializers.IntegerField()
    disk_free_gib = serializers.FloatField(allow_null=True)
    last_seen_at = serializers.DateTimeField(allow_null=True)
    hostd_seen_at = serializers.DateTimeField(allow_null=True)
    tunnel_address = serializers.IPAddressField(allow_null=True)
    vms = serializers.IntegerField(source="vm_count")
    vcpus_allowed = serializers.IntegerField(source="room.vcpus_allowed")
    vcpus_used = serializers.IntegerField(source="room.vcpus_used")
    memory_allowed_mib = serializers.IntegerField(source="room.memory_allowed_mib")
    memory_used_mib = serializers.IntegerField(source="room.memory_used_mib")
    images = HostImageSerializer(source="image_copies", many=True, help_text="The images it holds.")


class VmUpdateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=63, validators=[name_validator], required=False)
    metadata = serializers.DictField(required=False)
    vcpus = serializers.IntegerField(min_value=1, max_value=64, required=False)
    memory_mib = serializers.IntegerField(min_value=64, max_value=1024 * 1024, required=False)


class VmActionSerializer(serializers.Serializer):
    force = serializers.BooleanField(default=False)


class VmMigrateSerializer(serializers.Serializer):
    host = serializers.CharField(max_length=63, help_text="Name of the host to move the running VM to.")


class OperationSerializer(serializers.ModelSerializer):
    vm = serializers.UUIDField(source="vm_ref", read_only=True)
    requested_by = serializers.CharField(source="requested_by.username", read_only=True, default=None)

    class Meta:
        model = Operation
        fields = [
            "id",
            "vm",
            "action",
            "params",
            "status",
            "progress",
            "log",
            "error",
            "requested_by",
            "request_id",
            "created_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields


# Operation lists (vms.selectors.operation_rows): OperationSerializer's output from values() rows.
OPERATION_ROWS = RowRenderer(OperationSerializer)


class GrantSerializer(serializers.Serializer):
    user = serializers.CharField(required=False)
    group = serializers.CharField(required=False)
    permissions = serializers.ListField(child=serializers.CharField(max_length=64), min_length=1, max_length=16)

    def validate(self, attrs):
        if bool(attrs.get("user")) == bool(attrs.get("group")):
            raise serializers.ValidationError("Give exactly one of user or group.")
        return attrs


class RevokeSerializer(GrantSerializer):
    permissions = serializers.ListField(child=serializers.CharField(max_length=64), required=False, max_length=16)


class VmMoveSerializer(serializers.Serializer):
    host = serializers.SlugField(max_length=63, help_text="The name of the host to move the VM to.")


class HostDrainMoveSerializer(serializers.Serializer):
    vm = serializers.UUIDField()
    name = serializers.CharField()
    target = serializers.CharField()
    operation = serializers.UUIDField()
    mover = serializers.CharField(help_text="vm_move (cold move) or vm_migrate (live migration).")


class HostDrainStaySerializer(serializers.Serializer):
    vm = serializers.UUIDField()
    name = serializers.CharField()
    code = serializers.CharField()
    reason = serializers.CharField()


class HostDrainSerializer(serializers.Serializer):
    host = serializers.CharField()
    moves = HostDrainMoveSerializer(many=True)
    stays = HostDrainStaySerializer(many=True, help_text="VMs that stay on the host, and why.")
