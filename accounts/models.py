import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone


class Role(models.TextChoices):
    """Roles are Django groups of the same name; see docs/permissions.md."""

    ADMIN = "admin", "Admin"
    OPERATOR = "operator", "Operator"
    USER = "user", "User"
    VIEWER = "viewer", "Viewer"


class ApiToken(models.Model):
    """A bearer token. Only the SHA-256 of the secret is stored; the secret is shown once."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    prefix = models.CharField(
        max_length=16, db_index=True, help_text="First characters of the secret, to recognise it."
    )
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    read_only = models.BooleanField(default=False)
    project = models.ForeignKey(
        "accounts.Project",
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="tokens",
        help_text="When set, the token sees and acts only within this project.",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_active(self) -> bool:
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or self.expires_at > timezone.now()


class LoginThrottle(models.Model):
    """Failed logins of one account from one client address (``address`` set: locks that
    pair after SANDBOX_LOCKOUT_THRESHOLD failures), or of the account from everywhere
    (``address`` empty: past SANDBOX_LOGIN_ACCOUNT_CEILING failures it only slows attempts
    down with a growing delay, so nobody can lock somebody else out). See docs/security.md."""

    username = models.CharField(max_length=150)
    address = models.CharField(max_length=45, blank=True, help_text="client address; empty = the whole account")
    failures = models.PositiveIntegerField(default=0)
    last_failure_at = models.DateTimeField(null=True, blank=True)
    locked_until = models.DateTimeField(null=True, blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True, help_text="account-wide back-off")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["username", "address"], name="loginthrottle_user_address")]

    def __str__(self) -> str:
        return f"{self.username} from {self.address or 'anywhere'}"


class UserQuota(models.Model):
    """Resource limits of one user; users without a row get the defaults from settings."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="quota")
    max_vms = models.PositiveIntegerField()
    max_vcpus = models.PositiveIntegerField()
    max_memory_mib = models.PositiveIntegerField()
    max_disk_gib = models.PositiveIntegerField()

    def __str__(self) -> str:
        return f"quota of {self.user}"


class ProjectRole(models.TextChoices):
    """A member's role inside one project (docs/projects.md)."""

    OWNER = "owner", "Owner"
    MEMBER = "member", "Member"
    VIEWER = "viewer", "Viewer"


PERSONAL_SLUG_PREFIX = "personal-"


class Project(models.Model):
    """A group of users that owns VMs, networks and snapshots and shares one quota. Every
    user has a personal project (``personal_of``), made when the user is."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=100)
    slug = models.SlugField(max_length=63, unique=True)
    personal_of = models.OneToOneField(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="personal_project",
        help_text="The user whose personal project this is; empty for a team project.",
    )
    templates = models.ManyToManyField(
        "vms.Template",
        blank=True,
        related_name="projects",
        help_text="The templates the project's VMs may be created from; none chosen: every active template.",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.slug


class ProjectMembership(models.Model):
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="project_memberships")
    role = models.CharField(max_length=8, choices=ProjectRole.choices)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["project", "user"]
        constraints = [models.UniqueConstraint(fields=["project", "user"], name="projectmembership_unique_pair")]

    def __str__(self) -> str:
        return f"{self.user} in {self.project} ({self.role})"


class ProjectQuota(models.Model):
    """Resource limits shared by a project's members; a project without a row gets its
    personal owner's user quota (personal project) or SANDBOX_DEFAULT_PROJECT_QUOTA."""

    project = models.OneToOneField(Project, on_delete=models.CASCADE, related_name="quota")
    max_vms = models.PositiveIntegerField()
    max_vcpus = models.PositiveIntegerField()
    max_memory_mib = models.PositiveIntegerField()
    max_disk_gib = models.PositiveIntegerField()

    def __str__(self) -> str:
        return f"quota of project {self.project}"


class AuditResult(models.TextChoices):
    OK = "ok", "OK"
    DENIED = "denied", "Denied"
    FAILED = "failed", "Failed"


class AuditEvent(models.Model):
    """Append-only audit trail. Rows are written unsealed (``chain_seq`` null) in the caller's
    transaction and sealed into a hash chain after commit (``accounts.audit``): each sealed row
    holds its place in the chain and the hash of the row before it; ``manage.py audit_verify``
    finds the first broken link."""

    id = models.BigAutoField(primary_key=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True, editable=False)
    # No database constraint: deleting a user must not rewrite (and so break) audit rows.
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="+",
    )
    actor_username = models.CharField(max_length=150, blank=True)
    token_id = models.UUIDField(null=True, blank=True)
    source_ip = models.GenericIPAddressField(null=True, blank=True)
    request_id = models.CharField(max_length=64, blank=True, db_index=True)
    # What the client sent as X-Request-ID: its own label, not trusted, not our request id.
    client_request_id = models.CharField(max_length=64, blank=True)
    action = models.CharField(max_length=64, db_index=True)
    object_type = models.CharField(max_length=64, blank=True, db_index=True)
    object_id = models.CharField(max_length=64, blank=True, db_index=True)
    object_repr = models.CharField(max_length=200, blank=True)
    object_owner_id = models.BigIntegerField(null=True, blank=True, db_index=True)
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)
    result = models.CharField(max_length=8, choices=AuditResult.choices, default=AuditResult.OK)
    message = models.TextField(blank=True)
    # Set together when the row is sealed into the chain; null / empty while it is not yet.
    chain_seq = models.BigIntegerField(null=True, blank=True, unique=True, editable=False)
    prev_hash = models.CharField(max_length=64, blank=True, editable=False)
    hash = models.CharField(max_length=64, blank=True, editable=False)

    class Meta:
        # Newest first in seal order; rows not sealed yet (the newest) before all of them.
        ordering = [models.F("chain_seq").desc(nulls_first=True), "-id"]
        indexes = [
            # The sealer's work list stays small whatever the size of the log.
            models.Index(fields=["id"], condition=models.Q(chain_seq__isnull=True), name="auditevent_unsealed"),
        ]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.actor_username or '-'} {self.action} {self.result}"

    def save(self, *args, **kwargs):
        if self.pk is not None:
            raise ValueError("Audit events are append-only.")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise ValueError("Audit events are append-only.")
