from django.contrib.auth import get_user_model
from rest_framework import serializers

from accounts.models import ApiToken, AuditEvent, Project, ProjectMembership, ProjectRole, Role
from accounts.roles import user_role
from sandbox_site.api_rows import RowRenderer


class TokenSerializer(serializers.ModelSerializer):
    project = serializers.SlugRelatedField(
        slug_field="slug",
        read_only=True,
        allow_null=True,
        help_text="The project the token is limited to; null: all of yours.",
    )

    class Meta:
        model = ApiToken
        fields = [
            "id", "name", "prefix", "read_only", "project", "created_at", "expires_at", "last_used_at", "revoked_at",
        ]  # fmt: skip
        read_only_fields = fields


class TokenCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100)
    read_only = serializers.BooleanField(default=False)
    expires_at = serializers.DateTimeField(required=False, allow_null=True)
    project = serializers.CharField(
        max_length=63, required=False, help_text="Id or slug of a project of yours: the token acts only within it."
    )


class ProjectMemberSerializer(serializers.ModelSerializer):
    username = serializers.CharField(source="user.username", read_only=True)

    class Meta:
        model = ProjectMembership
        fields = ["username", "role", "created_at"]
        read_only_fields = fields


class ProjectSerializer(serializers.ModelSerializer):
    personal = serializers.SerializerMethodField()
    members = ProjectMemberSerializer(source="memberships", many=True, read_only=True)
    templates = serializers.SlugRelatedField(slug_field="name", many=True, read_only=True)

    class Meta:
        model = Project
        fields = ["id", "name", "slug", "personal", "members", "templates", "created_at"]
        read_only_fields = fields

    def get_personal(self, project) -> bool:
        return project.personal_of_id is not None


class ProjectCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100)
    slug = serializers.SlugField(max_length=63)


class ProjectMemberSetSerializer(serializers.Serializer):
    username = serializers.CharField(max_length=150)
    role = serializers.ChoiceField(choices=ProjectRole.choices)


class QuotaSerializer(serializers.Serializer):
    max_vms = serializers.IntegerField(min_value=0, max_value=1_000_000_000)
    max_vcpus = serializers.IntegerField(min_value=0, max_value=1_000_000_000)
    max_memory_mib = serializers.IntegerField(min_value=0, max_value=1_000_000_000)
    max_disk_gib = serializers.IntegerField(min_value=0, max_value=1_000_000_000)


class UsageSerializer(serializers.Serializer):
    vms = serializers.IntegerField()
    vcpus = serializers.IntegerField()
    memory_mib = serializers.IntegerField()
    disk_gib = serializers.IntegerField()


class ProjectUsageSerializer(serializers.Serializer):
    quota = QuotaSerializer()
    usage = UsageSerializer()


class UserSerializer(serializers.ModelSerializer):
    role = serializers.SerializerMethodField()
    # Not format "email": users created without one have "".
    email = serializers.CharField(read_only=True, help_text="may be empty")

    class Meta:
        model = get_user_model()
        fields = ["id", "username", "email", "role", "is_active", "date_joined", "last_login"]
        read_only_fields = fields

    def get_role(self, user) -> str | None:
        return user_role(user)


class UserCreateSerializer(serializers.Serializer):
    username = serializers.RegexField(r"^[\w.@+-]{1,150}$")
    password = serializers.CharField(write_only=True, max_length=128)
    role = serializers.ChoiceField(choices=Role.values)
    email = serializers.EmailField(required=False, default="")


class AuditEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = AuditEvent
        fields = [
            "id",
            "created_at",
            "actor_id",
            "actor_username",
            "token_id",
            "source_ip",
            "request_id",
            "client_request_id",
            "action",
            "object_type",
            "object_id",
            "object_repr",
            "before",
            "after",
            "result",
            "message",
            "chain_seq",
            "hash",
        ]
        read_only_fields = fields


# The audit list (accounts.api.AuditEventViewSet): AuditEventSerializer's output from values() rows.
AUDIT_EVENT_ROWS = RowRenderer(AuditEventSerializer)
