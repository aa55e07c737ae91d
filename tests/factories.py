import factory
from django.contrib.auth import get_user_model
from django.utils import timezone

from accounts.models import Role
from accounts.services import user_set_role
from vms.models import VM, Host, Image, Template

PASSWORD = "correct horse battery staple"


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    password = factory.PostGenerationMethodCall("set_password", PASSWORD)

    @factory.post_generation
    def role(self, create, extracted, **kwargs):
        self.save()
        user_set_role(user=self, role=extracted or Role.USER, actor=None, _audit=False)


class ImageFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Image
        django_get_or_create = ("name",)

    name = "test-image"
    status = Image.Status.READY
    kernel_path = "/nonexistent/vmlinuz"
    initramfs_path = "/nonexistent/initrd"
    rootfs_path = "/nonexistent/rootfs.ext4"


class TemplateFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Template
        django_get_or_create = ("name",)

    name = "test-template"
    image = factory.SubFactory(ImageFactory)
    vcpus = 1
    max_vcpus = 2
    memory_mib = 128
    max_memory_mib = 1024
    disk_gib = 1
    max_disk_gib = 4


class HostFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Host
        django_get_or_create = ("name",)

    name = "local"


class VmFactory(factory.django.DjangoModelFactory):
    """A VM row with its owner's object permissions, without running anything."""

    class Meta:
        model = VM
        skip_postgeneration_save = True

    name = factory.Sequence(lambda n: f"vm-{n}")
    owner = factory.SubFactory(UserFactory)
    template = factory.SubFactory(TemplateFactory)
    host = factory.SubFactory(HostFactory)
    state = "stopped"
    vcpus = 1
    memory_mib = 128
    disk_gib = 1
    driver = "qemu"

    @factory.post_generation
    def owner_perms(self, create, extracted, **kwargs):
        from guardian.shortcuts import assign_perm

        for codename in VM.object_permission_codenames():
            assign_perm(f"vms.{codename}", self.owner, self)


class SnapshotFactory(factory.django.DjangoModelFactory):
    """A ready snapshot row of ``vm`` (no files behind it)."""

    class Meta:
        model = "snapshots.Snapshot"

    vm = factory.SubFactory(VmFactory)
    vm_ref = factory.SelfAttribute("vm.pk")
    vm_name = factory.SelfAttribute("vm.name")
    owner = factory.SelfAttribute("vm.owner")
    host = factory.SelfAttribute("vm.host")
    template = factory.SelfAttribute("vm.template")
    name = factory.Sequence(lambda n: f"snap-{n}")
    state = "ready"
    vcpus = 1
    memory_mib = 128
    disk_gib = 1
    size_bytes = 1 << 20
    driver = "qemu"
    created_at = factory.LazyFunction(timezone.now)
    directory = factory.LazyAttribute(lambda s: f"/nonexistent/{s.name}")
