from rest_framework import serializers

from snapshots.models import RetentionPolicy, Snapshot


class SnapshotSerializer(serializers.ModelSerializer):
    vm = serializers.UUIDField(source="vm_ref", read_only=True)
    vm_exists = serializers.SerializerMethodField()
    owner = serializers.CharField(source="owner.username", read_only=True)
    host = serializers.CharField(source="host.name", read_only=True)
    parent = serializers.UUIDField(source="parent_id", read_only=True, allow_null=True)
    children = serializers.SerializerMethodField()

    class Meta:
        model = Snapshot
        fields = [
            "id",
            "name",
            "description",
            "vm",
            "vm_name",
            "vm_exists",
            "owner",
            "host",
            "state",
            "include_memory",
            "parent",
            "children",
            "driver",
            "vmm_version",
            "vcpus",
            "memory_mib",
            "disk_gib",
            "size_bytes",
            "pause_ms",
            "duration_ms",
            "checksum",
            "files",
            "disk_layer",
            "backing_chain",
            "error",
            "verified_at",
            "created_at",
        ]
        read_only_fields = fields

    def get_vm_exists(self, obj) -> bool:
        return obj.vm_id is not None

    def get_children(self, obj) -> list[str]:
        # Lists prefetch ``children`` (snapshots.selectors.snapshot_list_visible): no query per row.
        return [str(child.pk) for child in obj.children.all()]


class SnapshotCreatedSerializer(SnapshotSerializer):
    operation = serializers.UUIDField(read_only=True)

    class Meta(SnapshotSerializer.Meta):
        fields = [*SnapshotSerializer.Meta.fields, "operation"]
        read_only_fields = fields


class SnapshotCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100)
    description = serializers.CharField(max_length=1000, required=False, allow_blank=True, default="")
    include_memory = serializers.BooleanField(default=True)


class SnapshotCloneSerializer(serializers.Serializer):
    count = serializers.IntegerField(min_value=1, max_value=100, default=1)
    name_prefix = serializers.CharField(max_length=55, required=False, allow_blank=True, default="")
    project = serializers.CharField(
        max_length=63,
        required=False,
        help_text="Id or slug of the project the clones go into; default: the snapshot's, if you may create there.",
    )


class RetentionPolicyResultSerializer(serializers.Serializer):
    """A retention policy as the API answers it; all null when there is none."""

    keep_last = serializers.IntegerField(allow_null=True)
    keep_days = serializers.IntegerField(allow_null=True)
    updated_at = serializers.DateTimeField(allow_null=True)


class VmRetentionPolicyResultSerializer(RetentionPolicyResultSerializer):
    scope = serializers.ChoiceField(
        choices=["vm", "user"], allow_null=True, help_text="vm: the VM's own policy; user: its owner's default"
    )


def retention_body(policy) -> dict:
    if policy is None:
        return {"keep_last": None, "keep_days": None, "updated_at": None}
    return {"keep_last": policy.keep_last, "keep_days": policy.keep_days, "updated_at": policy.updated_at}


class RetentionPolicySerializer(serializers.ModelSerializer):
    class Meta:
        model = RetentionPolicy
        fields = ["keep_last", "keep_days", "updated_at"]
        read_only_fields = ["updated_at"]
        extra_kwargs = {"keep_last": {"required": False}, "keep_days": {"required": False}}
