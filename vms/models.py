import uuid

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.utils import timezone

name_validator = RegexValidator(
    r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", "Use 1-63 lowercase letters, digits and dashes (not at the ends)."
)


class OsType(models.TextChoices):
    LINUX = "linux", "Linux"
    WINDOWS = "windows", "Windows"


class BootMode(models.TextChoices):
    KERNEL = "kernel", "Direct kernel boot"
    UEFI = "uefi", "UEFI firmware"


class DiskFormat(models.TextChoices):
    RAW = "raw", "raw"
    QCOW2 = "qcow2", "qcow2"


class Image(models.Model):
    """A bootable guest image: a read-only base disk that VMs overlay, booted either directly
    (``kernel_path`` + ``initramfs_path``, the disk is the root filesystem) or by UEFI
    firmware (the disk is a whole GPT disk with an EFI system partition).

    Built here (``build_image``), uploaded or registered by operators (``vms.images``).
    A deprecated image stays usable by the VMs and templates that have it, but no new VM
    may pick it."""

    class Status(models.TextChoices):
        BUILDING = "building", "Building"
        READY = "ready", "Ready"
        FAILED = "failed", "Failed"
        MISSING = "missing", "Waiting for a disk"  # defined (e.g. windows) but nothing uploaded yet

    class Source(models.TextChoices):
        BUILT = "built", "Built here"
        UPLOADED = "uploaded", "Uploaded"
        REGISTERED = "registered", "Registered from the import directory"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.SlugField(max_length=64, unique=True)
    description = models.CharField(max_length=200, blank=True)
    os_type = models.CharField(max_length=16, choices=OsType.choices, default=OsType.LINUX)
    boot_mode = models.CharField(max_length=8, choices=BootMode.choices, default=BootMode.KERNEL)
    disk_format = models.CharField(max_length=8, choices=DiskFormat.choices, default=DiskFormat.RAW)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.BUILDING)
    source = models.CharField(max_length=16, choices=Source.choices, default=Source.BUILT)
    kernel_path = models.CharField(max_length=500, blank=True)
    initramfs_path = models.CharField(max_length=500, blank=True)
    rootfs_path = models.CharField(max_length=500, blank=True, help_text="The base disk VMs overlay.")
    digest = models.CharField(max_length=64, blank=True, help_text="Build input digest (built images).")
    sha256 = models.CharField(max_length=64, blank=True, help_text="SHA-256 of the base disk file.")
    file_sha256 = models.JSONField(
        default=dict,
        blank=True,
        help_text="SHA-256 of each file the image boots from, by role (rootfs, kernel, initramfs): what "
        "hosts check their copies against (vms.inventory). Recorded when the image is built or imported.",
    )
    size_bytes = models.BigIntegerField(default=0)
    virtual_size_bytes = models.BigIntegerField(default=0)
    min_disk_gib = models.PositiveSmallIntegerField(default=1, validators=[MinValueValidator(1)])
    min_memory_mib = models.PositiveIntegerField(default=64, validators=[MinValueValidator(64)])
    is_public = models.BooleanField(default=True, help_text="Every signed-in user may pick it (else: shared).")
    deprecated_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @staticmethod
    def object_permission_codenames() -> tuple[str, ...]:
        return ("view_image", "change_image", "delete_image")


class Template(models.Model):
    """What a VM is created from: sizes, limits, kernel command line and image."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.SlugField(max_length=64, unique=True)
    description = models.CharField(max_length=200, blank=True)
    image = models.ForeignKey(Image, on_delete=models.PROTECT, related_name="templates")
    vcpus = models.PositiveSmallIntegerField(default=1, validators=[MinValueValidator(1)])
    max_vcpus = models.PositiveSmallIntegerField(default=2, validators=[MinValueValidator(1), MaxValueValidator(64)])
    memory_mib = models.PositiveIntegerField(default=256, validators=[MinValueValidator(64)])
    max_memory_mib = models.PositiveIntegerField(default=1024, validators=[MinValueValidator(64)])
    disk_gib = models.PositiveSmallIntegerField(default=2, validators=[MinValueValidator(1)])
    max_disk_gib = models.PositiveSmallIntegerField(default=10, validators=[MinValueValidator(1)])
    kernel_cmdline = models.CharField(max_length=500, blank=True)
    is_active = models.BooleanField(default=True)
    golden_snapshot = models.BooleanField(
        default=True,
        help_text="Create VMs by restoring the template's golden snapshot (booted once, kept per host); "
        "off: every VM cold boots. Cold boot is also the fallback when the snapshot is missing or bad.",
    )
    pool_size = models.PositiveSmallIntegerField(
        default=0,
        validators=[MaxValueValidator(100)],
        help_text="Restored, paused VMs kept ready per host (needs a golden snapshot); a create takes one.",
    )

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Host(models.Model):
    """A hypervisor host; its Celery workers consume the ``host.<name>`` queue."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.SlugField(max_length=64, unique=True)
    is_active = models.BooleanField(default=True)
    cordoned = models.BooleanField(
        default=False, help_text="Placement puts no new VMs here; the VMs already here keep running."
    )
    driver = models.CharField(max_length=32, blank=True, help_text="Driver the host's workers use.")
    acceleration = models.CharField(max_length=8, blank=True)
    last_seen_at = models.DateTimeField(
        null=True, blank=True, help_text="Last heartbeat of the host's worker (its reconcile pass)."
    )
    hostd_address = models.CharField(
        max_length=255,
        blank=True,
        help_text="host:port of hostd's mutual-TLS listener, for web and workers on other hosts "
        "(empty: reached through the local socket only).",
    )
    tunnel_address = models.GenericIPAddressField(
        protocol="IPv4",
        null=True,
        blank=True,
        help_text="Underlay IPv4 address of the host's VXLAN tunnels to other hosts (networks spanning "
        "hosts); empty: the host takes no part in them.",
    )
    boot_modes = models.JSONField(
        default=list,
        blank=True,
        help_text="Boot modes the host's driver can run (kernel, uefi), as its heartbeat reports them; "
        "empty: not reported yet (placement does not filter such a host by boot mode).",
    )
    hostd_seen_at = models.DateTimeField(null=True, blank=True, help_text="Last time hostd answered the heartbeat.")
    hostd_status = models.JSONField(default=dict, blank=True, help_text="hostd's answer: VMs attached, agent links up.")
    cpus = models.PositiveIntegerField(default=0, help_text="CPUs of the host, as its heartbeat reports them.")
    memory_mib = models.PositiveIntegerField(default=0, help_text="Memory of the host, as its heartbeat reports it.")
    disk_free_gib = models.FloatField(
        null=True, blank=True, help_text="Free disk for VM disks above the reserve, as its heartbeat reports it."
    )
    # Admission (vms.admission): empty = the site-wide setting.
    cpu_overcommit = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.1), MaxValueValidator(64)],
        help_text="vCPUs admitted per host CPU (empty: SANDBOX_CPU_OVERCOMMIT).",
    )
    memory_overcommit = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.1), MaxValueValidator(4)],
        help_text="VM memory (guest RAM + VMM overhead) admitted per MiB of host memory left after the reserve "
        "(empty: SANDBOX_MEMORY_OVERCOMMIT).",
    )
    reserve_memory_mib = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Host memory kept for the host itself (empty: SANDBOX_HOST_RESERVE_MEMORY_MIB).",
    )
    reserve_cpus = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="Host CPUs kept for the host itself (empty: SANDBOX_HOST_RESERVE_CPUS)."
    )

    def __str__(self) -> str:
        return self.name

    @property
    def queue(self) -> str:
        return f"host.{self.name}"


class HostImage(models.Model):
    """An image's files as one host holds them (``vms.inventory``): the host's worker hashes
    them (once per file size and modification time) and compares with the image's
    ``file_sha256``. Present copies are sources for hosts that lack the image
    (``vms.distribution``); a corrupt one is never a source and is copied again when a VM
    needs it there. No row: the host does not hold the image."""

    class Status(models.TextChoices):
        PRESENT = "present", "Present (verified)"
        CORRUPT = "corrupt", "Corrupt or incomplete"
        UNVERIFIED = "unverified", "Present, no recorded SHA-256 to check against"

    id = models.BigAutoField(primary_key=True)
    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="images")
    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="copies")
    status = models.CharField(max_length=16, choices=Status.choices, db_index=True)
    files = models.JSONField(
        default=dict, blank=True, help_text="role -> {path, size, mtime_ns, sha256}: the hash cache of each file."
    )
    error = models.CharField(max_length=500, blank=True)
    verified_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["host__name", "image__name"]
        constraints = [models.UniqueConstraint(fields=["host", "image"], name="host_image_one_per_host")]

    def __str__(self) -> str:
        return f"{self.image_id} on {self.host_id}: {self.status}"


class VmState(models.TextChoices):
    """Stable states, and the transitional ones an operation holds while it talks to the VMM
    (the table of allowed changes is ``vms.transitions.TRANSITIONS``)."""

    CREATING = "creating", "Creating"
    STOPPED = "stopped", "Stopped"
    STARTING = "starting", "Starting"
    RUNNING = "running", "Running"
    PAUSED = "paused", "Paused"
    STOPPING = "stopping", "Stopping"
    ERROR = "error", "Error"
    DELETING = "deleting", "Deleting"
    PAUSING = "pausing", "Pausing"
    RESUMING = "resuming", "Resuming"
    REBOOTING = "rebooting", "Rebooting"
    RESIZING = "resizing", "Resizing"
    SNAPSHOTTING = "snapshotting", "Snapshotting"
    MIGRATING = "migrating", "Migrating"
    UNKNOWN = "unknown", "Unknown (host down)"
    MOVING = "moving", "Moving to another host"


# What a VM row shows besides its own fields (owner, template, boot image, host): lists and
# detail views join them in the same query (``boot_image`` reads ``template.image``).
VM_ROW_RELATED = ("owner", "project", "template__image", "image", "host")


class VmPurpose(models.TextChoices):
    """Who a VM is for. Only ``user`` VMs are ever shown to users; the others belong to the
    system account (``vms.services.system_user``) until a create takes a pool VM."""

    USER = "", "User VM"
    GOLDEN = "golden", "Builds a golden snapshot"
    POOL = "pool", "Warm pool (not taken yet)"


class VM(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=63, validators=[name_validator])
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="vms")
    # The project the VM belongs to (its members' roles give rights on it; its quota counts
    # it); ``owner`` stays the user who created it. Empty on save: the owner's personal project.
    project = models.ForeignKey("accounts.Project", on_delete=models.PROTECT, related_name="vms")
    template = models.ForeignKey(Template, on_delete=models.PROTECT, related_name="vms")
    image = models.ForeignKey(
        Image,
        on_delete=models.PROTECT,
        related_name="vms",
        null=True,
        blank=True,
        help_text="The image picked at creation; empty: the template's.",
    )
    host = models.ForeignKey(Host, on_delete=models.PROTECT, related_name="vms", null=True, blank=True)
    # While a running VM is ``moving``: the host it starts on (its size is held there too,
    # ``vms.selectors.hosts_with_load``).
    move_target = models.ForeignKey(
        Host, on_delete=models.SET_NULL, related_name="vms_incoming", null=True, blank=True, editable=False
    )
    state = models.CharField(max_length=16, choices=VmState.choices, default=VmState.CREATING, db_index=True)
    vcpus = models.PositiveSmallIntegerField()
    memory_mib = models.PositiveIntegerField()
    disk_gib = models.PositiveSmallIntegerField()
    metadata = models.JSONField(default=dict, blank=True)
    driver = models.CharField(max_length=32, blank=True)
    acceleration = models.CharField(max_length=8, blank=True)
    vmm_pid = models.IntegerField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    last_console = models.TextField(blank=True, help_text="Last console lines kept when the VM failed.")
    purpose = models.CharField(
        max_length=8, choices=VmPurpose.choices, default=VmPurpose.USER, blank=True, db_index=True
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["owner", "name"], name="vm_unique_name_per_owner")]
        permissions = [
            ("power_vm", "Start, stop, reboot, pause and resume the VM"),
            ("console_vm", "Use the VM's serial console"),
            ("exec_vm", "Run commands and move files in the VM"),
            ("snapshot_vm", "Take and restore snapshots of the VM"),
        ]
        verbose_name = "VM"

    def __str__(self) -> str:
        return self.name

    def save(self, *args, **kwargs):
        if self.project_id is None and self.owner_id is not None:
            from accounts.services import project_personal_ensure

            self.project = project_personal_ensure(self.owner)
        super().save(*args, **kwargs)

    @staticmethod
    def users_may_see() -> models.Q:
        """The VMs any user may ever see (``accounts.permissions.visible_queryset``): not the
        golden-snapshot builders nor the warm pool's VMs before a create takes them."""
        return models.Q(purpose=VmPurpose.USER)

    @property
    def user_visible(self) -> bool:
        return self.purpose == VmPurpose.USER

    @property
    def boot_image(self) -> Image:
        """The image this VM boots: the one picked at creation, else its template's."""
        return self.image if self.image_id else self.template.image

    @staticmethod
    def object_permission_codenames() -> tuple[str, ...]:
        return ("view_vm", "change_vm", "delete_vm", "power_vm", "console_vm", "exec_vm", "snapshot_vm")


class Operation(models.Model):
    """One long action (create, start, stop, ...) run by a Celery task; the dashboard streams it."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"

    LOG_LIMIT = 64 * 1024  # bytes of log kept per operation; older lines are dropped first

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    vm = models.ForeignKey(VM, on_delete=models.SET_NULL, null=True, blank=True, related_name="operations")
    vm_ref = models.UUIDField(null=True, blank=True, db_index=True, help_text="VM id, kept after the VM is deleted.")
    vm_owner_id = models.BigIntegerField(null=True, blank=True, db_index=True)
    action = models.CharField(max_length=32)
    params = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True)
    progress = models.PositiveSmallIntegerField(default=0)
    log = models.TextField(blank=True)
    error = models.TextField(blank=True)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="operations"
    )
    request_id = models.CharField(max_length=64, blank=True)
    worker = models.CharField(max_length=200, blank=True, help_text="host:pid of the worker process running it.")
    attempts = models.PositiveSmallIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.action} {self.vm_ref} {self.status}"


class ResourceSample(models.Model):
    """One resource reading of a running VM, taken by the host's sampler (beat).
    Counters are cumulative since the VMM started; the API turns them into rates."""

    id = models.BigAutoField(primary_key=True)
    vm = models.ForeignKey(VM, on_delete=models.CASCADE, related_name="samples")
    taken_at = models.DateTimeField(default=timezone.now, db_index=True)
    cpu_seconds = models.FloatField(help_text="CPU time used by the VMM process")
    rss_bytes = models.BigIntegerField()
    memory_bytes = models.BigIntegerField(help_text="Memory given to the guest")
    disk_read_bytes = models.BigIntegerField(default=0)
    disk_write_bytes = models.BigIntegerField(default=0)
    net_rx_bytes = models.BigIntegerField(default=0)
    net_tx_bytes = models.BigIntegerField(default=0)

    class Meta:
        ordering = ["taken_at"]
        indexes = [models.Index(fields=["vm", "taken_at"])]

    def __str__(self) -> str:
        return f"{self.vm_id} @ {self.taken_at:%Y-%m-%d %H:%M:%S}"
