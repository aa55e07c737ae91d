import uuid

from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone


class Snapshot(models.Model):
    """A saved state of a VM: a frozen disk layer (copy-on-write: later layers sit on top of
    it) and, with ``include_memory``, the device + RAM state. Files live on ``host`` under
    ``directory``; ``checksum`` is the sha256 of the directory's integrity manifest."""

    class State(models.TextChoices):
        CREATING = "creating", "Creating"
        READY = "ready", "Ready"
        FAILED = "failed", "Failed"
        DELETING = "deleting", "Deleting"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    vm = models.ForeignKey("vms.VM", on_delete=models.SET_NULL, null=True, blank=True, related_name="snapshots")
    vm_ref = models.UUIDField(db_index=True, help_text="VM id, kept after the VM is deleted.")
    vm_name = models.CharField(max_length=63, blank=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="snapshots")
    # The VM's project when it was taken (empty on save: the VM's, else the owner's personal one).
    project = models.ForeignKey("accounts.Project", on_delete=models.PROTECT, related_name="snapshots")
    host = models.ForeignKey("vms.Host", on_delete=models.PROTECT, related_name="snapshots")
    template = models.ForeignKey("vms.Template", on_delete=models.PROTECT, related_name="snapshots")
    # The image the VM booted when it was not its template's (clones boot the same way).
    image = models.ForeignKey("vms.Image", on_delete=models.PROTECT, related_name="snapshots", null=True, blank=True)
    name = models.CharField(max_length=100)
    description = models.CharField(max_length=1000, blank=True)
    include_memory = models.BooleanField(default=True)
    parent = models.ForeignKey(
        "self",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="children",
        help_text="The snapshot the VM descended from when this one was taken (its disk layer sits on the parent's).",
    )
    state = models.CharField(max_length=16, choices=State.choices, default=State.CREATING, db_index=True)
    driver = models.CharField(max_length=32, blank=True)
    vmm_version = models.CharField(max_length=64, blank=True)
    directory = models.CharField(max_length=500, blank=True)
    disk_layer = models.CharField(max_length=500, blank=True, help_text="Absolute path of the frozen disk layer.")
    backing_chain = models.JSONField(default=list, blank=True, help_text="Layers below disk_layer, nearest first.")
    shared_layer = models.BooleanField(
        default=True, help_text="Other layers (children, VMs) use disk_layer as their backing file."
    )
    vcpus = models.PositiveSmallIntegerField(validators=[MinValueValidator(1)])
    memory_mib = models.PositiveIntegerField()
    disk_gib = models.PositiveSmallIntegerField()
    size_bytes = models.BigIntegerField(default=0)
    pause_ms = models.PositiveIntegerField(null=True, blank=True)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    checksum = models.CharField(max_length=64, blank=True, help_text="sha256 of manifest.json.")
    files = models.JSONField(default=dict, blank=True, help_text="name -> size of every file in the manifest.")
    error = models.TextField(blank=True)
    verified_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["vm_ref", "name"], name="snapshot_unique_name_per_vm")]

    def __str__(self) -> str:
        return f"{self.vm_name}/{self.name}"

    def save(self, *args, **kwargs):
        if self.project_id is None:
            if self.vm_id is not None:
                self.project_id = self.vm.project_id
            elif self.owner_id is not None:
                from accounts.services import project_personal_ensure

                self.project = project_personal_ensure(self.owner)
        super().save(*args, **kwargs)


class VmLineage(models.Model):
    """Which snapshot a VM's current disk descends from: set when a snapshot is taken (the
    VM's new overlay sits on it), restored or cloned. It is the parent of the VM's next
    snapshot, and (for shared layers) a dependency that blocks deleting that snapshot."""

    vm = models.OneToOneField("vms.VM", on_delete=models.CASCADE, primary_key=True, related_name="lineage")
    snapshot = models.ForeignKey(Snapshot, on_delete=models.PROTECT, related_name="descendant_vms")
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.vm_id} on {self.snapshot_id}"


class RetentionPolicy(models.Model):
    """Keep the newest ``keep_last`` snapshots and/or those younger than ``keep_days`` days,
    for one VM or for all of a user's VMs (a VM policy wins over its owner's). A snapshot
    is kept when either rule keeps it; a rule left empty keeps nothing by itself."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    vm = models.OneToOneField(
        "vms.VM", on_delete=models.CASCADE, null=True, blank=True, related_name="snapshot_retention"
    )
    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, null=True, blank=True, related_name="snapshot_retention"
    )
    keep_last = models.PositiveIntegerField(null=True, blank=True)
    keep_days = models.PositiveIntegerField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=(
                    models.Q(vm__isnull=False, user__isnull=True) | models.Q(vm__isnull=True, user__isnull=False)
                ),
                name="retention_for_vm_xor_user",
            ),
        ]

    def __str__(self) -> str:
        target = f"vm {self.vm_id}" if self.vm_id else f"user {self.user_id}"
        return f"retention of {target}: last {self.keep_last}, {self.keep_days} days"


class GoldenSnapshot(models.Model):
    """The golden snapshot of a template on a host: a memory+disk snapshot of a VM of the
    template booted once to its agent. New VMs of the template restore it (the clone path:
    their own identity) instead of booting a kernel. ``inputs`` is a digest of what the
    snapshot was built from (image version, sizes, kernel command line): when the template's
    current inputs differ, the snapshot is stale and is rebuilt (``snapshots.golden``)."""

    class Status(models.TextChoices):
        BUILDING = "building", "Building"
        READY = "ready", "Ready"
        FAILED = "failed", "Failed"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    template = models.ForeignKey("vms.Template", on_delete=models.CASCADE, related_name="golden_snapshots")
    host = models.ForeignKey("vms.Host", on_delete=models.CASCADE, related_name="golden_snapshots")
    snapshot = models.OneToOneField(
        Snapshot, on_delete=models.SET_NULL, null=True, blank=True, related_name="golden",
        help_text="The snapshot (directory, manifest checksum) new VMs restore.",
    )  # fmt: skip
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.BUILDING, db_index=True)
    image_version = models.CharField(max_length=200, blank=True, help_text="Image name and digest it was built from.")
    inputs = models.CharField(max_length=64, blank=True, help_text="sha256 of the build inputs (staleness check).")
    operation = models.UUIDField(null=True, blank=True, help_text="The build operation.")
    error = models.TextField(blank=True)
    built_at = models.DateTimeField(null=True, blank=True)
    requested_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["template__name"]
        constraints = [models.UniqueConstraint(fields=["template", "host"], name="golden_one_per_template_and_host")]

    def __str__(self) -> str:
        return f"golden {self.template_id} on {self.host_id}"
