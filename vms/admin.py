from django import forms
from django.contrib import admin, messages
from guardian.admin import GuardedModelAdmin

from sandbox_site.errors import ApplicationError
from vms import images
from vms.models import VM, BootMode, DiskFormat, Host, HostImage, Image, Operation, OsType, Template


class ImageAddForm(forms.ModelForm):
    """Upload a disk or register one from SANDBOX_IMAGE_IMPORT_DIR; ``vms.images`` checks it."""

    disk = forms.FileField(required=False, help_text="Upload a raw or qcow2 disk ...")
    import_path = forms.CharField(required=False, help_text="... or a path relative to SANDBOX_IMAGE_IMPORT_DIR.")
    sha256 = forms.CharField(min_length=64, max_length=64, help_text="SHA-256 of the disk file.")
    disk_format = forms.ChoiceField(choices=DiskFormat.choices)
    boot_mode = forms.ChoiceField(choices=BootMode.choices, initial=BootMode.UEFI)
    os_type = forms.ChoiceField(choices=OsType.choices)

    class Meta:
        model = Image
        fields = ["name", "description", "min_disk_gib", "min_memory_mib", "is_public"]

    def clean(self):
        data = super().clean()
        if bool(data.get("disk")) == bool(data.get("import_path")):
            raise forms.ValidationError("Give exactly one of an uploaded disk or an import path.")
        return data

    def validate_unique(self):
        pass  # the service answers a taken name (and fills a "missing" image of that name)


@admin.register(Image)
class ImageAdmin(admin.ModelAdmin):
    """Images are added, deprecated and deleted through ``vms.images`` (same checks as the API)."""

    list_display = [
        "name",
        "os_type",
        "boot_mode",
        "disk_format",
        "status",
        "deprecated_at",
        "size_bytes",
        "updated_at",
    ]
    list_filter = ["status", "os_type", "boot_mode", "source"]
    search_fields = ["name", "digest", "sha256"]
    actions = ["deprecate_selected"]
    readonly_fields = [
        "status", "source", "kernel_path", "initramfs_path", "rootfs_path", "digest", "sha256",
        "size_bytes", "virtual_size_bytes", "deprecated_at", "created_by", "created_at",
    ]  # fmt: skip

    def get_form(self, request, obj=None, **kwargs):
        if obj is None:
            kwargs["form"] = ImageAddForm
        return super().get_form(request, obj, **kwargs)

    def get_readonly_fields(self, request, obj=None):
        return self.readonly_fields if obj is not None else []

    def get_fields(self, request, obj=None):
        if obj is None:
            return ["name", "description", "disk", "import_path", "sha256", "disk_format", "boot_mode", "os_type",
                    "min_disk_gib", "min_memory_mib", "is_public"]  # fmt: skip
        return super().get_fields(request, obj)

    def save_model(self, request, obj, form, change):
        if change:
            images.image_update(
                image=obj,
                actor=request.user,
                **{k: form.cleaned_data[k] for k in ("description", "min_disk_gib", "min_memory_mib", "is_public")},
            )
            return
        data = form.cleaned_data
        fields = {
            k: data[k]
            for k in ("name", "description", "sha256", "disk_format", "boot_mode", "os_type", "min_disk_gib",
                      "min_memory_mib", "is_public")
        }  # fmt: skip
        try:
            if data.get("disk"):
                created = images.image_upload(actor=request.user, chunks=data["disk"].chunks(), **fields)
            else:
                created = images.image_register(actor=request.user, path=data["import_path"], **fields)
        except ApplicationError as exc:
            raise forms.ValidationError(exc.message) from exc
        obj.pk = created.pk
        obj._state.adding = False

    def add_view(self, request, form_url="", extra_context=None):
        try:
            return super().add_view(request, form_url, extra_context)
        except forms.ValidationError as exc:
            self.message_user(request, f"Image refused: {' '.join(exc.messages)}", level=messages.ERROR)
            from django.http import HttpResponseRedirect

            return HttpResponseRedirect(request.path)

    def delete_model(self, request, obj):
        self.delete_queryset(request, [obj])

    def delete_queryset(self, request, queryset):
        for image in queryset:
            try:
                images.image_delete(image=image, actor=request.user)
            except ApplicationError as exc:  # in use: say so instead of a server error
                self.message_user(request, f"{image.name}: {exc.message} {exc.details or ''}", level=messages.ERROR)

    @admin.action(description="Deprecate the selected images (no new VMs)")
    def deprecate_selected(self, request, queryset):
        for image in queryset:
            images.image_deprecate(image=image, actor=request.user)


@admin.register(Template)
class TemplateAdmin(admin.ModelAdmin):
    list_display = [
        "name", "image", "vcpus", "memory_mib", "disk_gib", "max_vcpus", "max_memory_mib", "golden_snapshot",
        "pool_size", "is_active",
    ]  # fmt: skip
    list_filter = ["is_active", "image", "golden_snapshot"]
    search_fields = ["name", "description"]
    # snapshots.admin adds the golden snapshot build action to `actions`.


class HostImageInline(admin.TabularInline):
    """The images the host holds, as its worker's inventory pass found them (read-only)."""

    model = HostImage
    fields = ["image", "status", "error", "verified_at", "files"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    """Capacity comes from the host's heartbeat; admission ratios and reserves are the operator's
    (empty: the site-wide settings, ``vms.admission``)."""

    list_display = [
        "name",
        "is_active",
        "cordoned",
        "driver",
        "acceleration",
        "cpus",
        "memory_mib",
        "cpu_overcommit",
        "memory_overcommit",
        "last_seen_at",
    ]
    list_filter = ["is_active", "cordoned"]
    search_fields = ["name"]
    actions = ["cordon_selected", "uncordon_selected", "drain_selected", "remove_selected"]
    inlines = [HostImageInline]
    readonly_fields = [
        "boot_modes",
        "cpus",
        "memory_mib",
        "disk_free_gib",
        "last_seen_at",
        "hostd_seen_at",
        "hostd_status",
        "admits",
        "hostd_address",
        "tunnel_address",
    ]
    fieldsets = [
        (None, {"fields": ["name", "is_active", "cordoned", "driver", "boot_modes", "acceleration"]}),
        (
            "Admission",
            {
                "fields": [
                    "cpus",
                    "memory_mib",
                    "disk_free_gib",
                    "cpu_overcommit",
                    "memory_overcommit",
                    "reserve_cpus",
                    "reserve_memory_mib",
                    "admits",
                ]
            },
        ),
        ("Heartbeat", {"fields": ["last_seen_at", "hostd_seen_at", "hostd_status"]}),
        # Set by `manage.py host_join` (audited) and the host's heartbeat, not edited here.
        ("Joined", {"fields": ["hostd_address", "tunnel_address"]}),
    ]

    @admin.action(description="Cordon: place no new VMs on the selected hosts")
    def cordon_selected(self, request, queryset):
        from vms.hosts import host_cordon

        for host in queryset:
            host_cordon(host=host, cordoned=True, actor=request.user)

    @admin.action(description="Uncordon the selected hosts")
    def uncordon_selected(self, request, queryset):
        from vms.hosts import host_cordon

        for host in queryset:
            host_cordon(host=host, cordoned=False, actor=request.user)

    @admin.action(description="Drain: cordon the selected hosts and move their VMs to other hosts")
    def drain_selected(self, request, queryset):
        from sandbox_site.errors import ApplicationError
        from vms.hosts import host_drain

        for host in queryset:
            try:
                result = host_drain(host=host, actor=request.user)
            except ApplicationError as exc:
                self.message_user(request, f"{host.name}: {exc.message}", level=messages.ERROR)
                continue
            self.message_user(request, f"{host.name}: {len(result['moves'])} VM(s) moving away")
            for stay in result["stays"]:
                self.message_user(request, f"{host.name}: {stay['name']} stays: {stay['reason']}", messages.WARNING)

    @admin.action(description="Remove the selected hosts (only those without VMs)")
    def remove_selected(self, request, queryset):
        from sandbox_site.errors import ApplicationError
        from vms.hosts import host_remove

        for host in queryset:
            try:
                host_remove(host=host, actor=request.user)
            except ApplicationError as exc:
                self.message_user(request, f"{host.name}: {exc.message}", level=messages.ERROR)

    @admin.display(description="Admits now")
    def admits(self, host: Host) -> str:
        from vms.admission import host_room

        if host.pk is None:
            return "-"
        room = host_room(host)
        return (
            f"{room.vcpus_used} of {room.vcpus_allowed} vCPUs and {room.memory_used_mib} of "
            f"{room.memory_allowed_mib} MiB held by {room.vms} VM(s)"
        )


@admin.register(VM)
class VmAdmin(GuardedModelAdmin):
    """Object permissions (sharing) are edited from the "Object permissions" button."""

    list_display = [
        "name", "owner", "state", "purpose", "template", "host", "vcpus", "memory_mib", "driver", "created_at",
    ]  # fmt: skip
    list_filter = ["state", "purpose", "driver", "template", "host"]
    search_fields = ["name", "id", "owner__username"]
    readonly_fields = [
        "id",
        "state",
        "driver",
        "acceleration",
        "vmm_pid",
        "started_at",
        "last_error",
        "last_console",
        "created_at",
    ]

    def has_add_permission(self, request):
        return False  # VMs are created through the API/dashboard so the lifecycle runs


@admin.register(Operation)
class OperationAdmin(admin.ModelAdmin):
    list_display = ["created_at", "action", "vm_ref", "status", "progress", "requested_by"]
    list_filter = ["status", "action"]
    search_fields = ["vm_ref", "request_id", "error"]
    readonly_fields = [f.name for f in Operation._meta.fields]

    def has_add_permission(self, request):
        return False
