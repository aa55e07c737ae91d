"""Image inventory and placement by what a host can boot and holds (vms.inventory,
vms.placement): each host's worker records which images it holds, checked against the image's
canonical sha256 (hashing a file again only when its size or modification time changed); its
heartbeat records the driver and the boot modes it runs; a VM goes only to hosts that boot its
image and, among equally roomy ones, to one that already holds it; operators see it all."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from django.utils import timezone

from accounts.models import UserQuota
from sandbox_site.errors import ConflictError
from tests.factories import PASSWORD, HostFactory, ImageFactory, TemplateFactory
from tests.vms.test_moves import _vm_on_h1, two  # noqa: F401 - two hostds and a VM on h1
from vms import hypervisor, inventory, operations, services
from vms.models import Host, HostImage, Image, Operation

pytestmark = pytest.mark.django_db


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def image_dir(settings, tmp_path):
    settings.SANDBOX_IMAGE_DIR = tmp_path / "images"
    settings.SANDBOX_IMAGE_STORE = tmp_path / "store"
    (tmp_path / "images" / "d1").mkdir(parents=True)
    return tmp_path / "images"


def _kernel_image(image_dir: Path, name="small", **fields) -> Image:
    """A direct-boot image of three small files under the image directory, hashes recorded."""
    files = {"rootfs": b"root" * 1000, "kernel": b"kernel", "initramfs": b"initrd"}
    paths = {"rootfs": "rootfs.ext4", "kernel": "vmlinuz", "initramfs": "initramfs.cpio.gz"}
    for role, data in files.items():
        (image_dir / "d1" / paths[role]).write_bytes(data)
    return ImageFactory(
        name=name,
        rootfs_path=str(image_dir / "d1" / paths["rootfs"]),
        kernel_path=str(image_dir / "d1" / paths["kernel"]),
        initramfs_path=str(image_dir / "d1" / paths["initramfs"]),
        **{
            "file_sha256": {role: _sha(data) for role, data in files.items()},
            "sha256": _sha(files["rootfs"]),
            **fields,
        },
    )


def test_it_records_the_images_a_host_holds_and_hashes_a_file_again_only_when_it_changed(image_dir, monkeypatch):
    host = HostFactory(name="h1")
    image = _kernel_image(image_dir)
    elsewhere = ImageFactory(name="elsewhere", rootfs_path="/nonexistent/disk.raw", file_sha256={"rootfs": "0" * 64})
    hashed: list[str] = []
    real = inventory.sha256_file
    monkeypatch.setattr(inventory, "sha256_file", lambda path: hashed.append(Path(path).name) or real(path))

    assert inventory.host_inventory_update(host) == {"present": 1, "corrupt": 0, "unverified": 0, "gone": 0}
    row = HostImage.objects.get(host=host)
    assert (row.image, row.status, row.error) == (image, HostImage.Status.PRESENT, "")
    assert row.files["kernel"]["sha256"] == image.file_sha256["kernel"]
    assert sorted(hashed) == ["initramfs.cpio.gz", "rootfs.ext4", "vmlinuz"]
    assert not HostImage.objects.filter(image=elsewhere).exists()  # no file of it here: no row

    hashed.clear()
    inventory.host_inventory_update(host)
    assert hashed == []  # unchanged files: stat only

    # The kernel's bytes change (new size and mtime): hashed again, and the copy is corrupt.
    (image_dir / "d1" / "vmlinuz").write_bytes(b"tampered kernel")
    assert inventory.host_inventory_update(host)["corrupt"] == 1
    assert hashed == ["vmlinuz"]
    row.refresh_from_db()
    assert row.status == HostImage.Status.CORRUPT
    assert "kernel has sha256" in row.error

    # Its files gone: the host no longer holds it.
    for entry in (image_dir / "d1").iterdir():
        entry.unlink()
    assert inventory.host_inventory_update(host)["gone"] == 1
    assert not HostImage.objects.filter(host=host).exists()


def test_a_missing_file_makes_a_copy_corrupt_and_an_image_without_hashes_is_unverified(image_dir):
    host = HostFactory(name="h1")
    image = _kernel_image(image_dir)
    (image_dir / "d1" / "initramfs.cpio.gz").unlink()
    legacy = ImageFactory(name="legacy", rootfs_path=str(image_dir / "d1" / "rootfs.ext4"), kernel_path="")
    legacy.boot_mode = "uefi"
    legacy.save()
    inventory.host_inventory_update(host)
    rows = {row.image_id: row for row in HostImage.objects.filter(host=host)}
    assert rows[image.pk].status == HostImage.Status.CORRUPT
    assert "initramfs missing" in rows[image.pk].error
    assert rows[legacy.pk].status == HostImage.Status.UNVERIFIED


def test_the_build_records_the_canonical_hashes_of_the_image_files(image_dir):
    image = _kernel_image(image_dir)
    Image.objects.filter(pk=image.pk).update(file_sha256={}, sha256="")
    image.refresh_from_db()
    hashes = inventory.image_file_sha256_record(image)
    image.refresh_from_db()
    assert image.file_sha256 == hashes
    assert image.sha256 == hashes["rootfs"] == _sha(b"root" * 1000)


def test_the_heartbeat_records_the_driver_and_the_boot_modes_it_runs(fake, settings, tmp_path):
    host = HostFactory(name=settings.SANDBOX_HOST_NAME)
    operations.host_heartbeat(host, timezone.now())
    host.refresh_from_db()
    assert (host.driver, host.boot_modes) == ("fake", ["kernel", "uefi"])

    # QEMU boots UEFI only with its OVMF files; cloud-hypervisor only with its firmware file.
    settings.SANDBOX_QEMU_OVMF_CODE = str(tmp_path / "missing.fd")
    assert hypervisor.driver_boot_modes("qemu") == ["kernel"]
    settings.SANDBOX_CLOUD_HYPERVISOR_FIRMWARE = ""
    assert hypervisor.driver_boot_modes("cloud-hypervisor") == ["kernel"]
    firmware = tmp_path / "CLOUDHV.fd"
    firmware.write_bytes(b"fw")
    settings.SANDBOX_CLOUD_HYPERVISOR_FIRMWARE = str(firmware)
    assert hypervisor.driver_boot_modes("cloud-hypervisor") == ["kernel", "uefi"]


# --- placement ------------------------------------------------------------------------------


@pytest.fixture
def sizes(settings, owner):
    settings.SANDBOX_VMM_MEMORY_OVERHEAD_MIB = 256
    settings.SANDBOX_CPU_OVERCOMMIT = 4.0
    settings.SANDBOX_MEMORY_OVERCOMMIT = 1.0
    settings.SANDBOX_HOST_RESERVE_MEMORY_MIB = 1024
    settings.SANDBOX_HOST_RESERVE_CPUS = 0
    settings.SANDBOX_NETWORKING = False
    UserQuota.objects.update_or_create(
        user=owner, defaults={"max_vms": 100, "max_vcpus": 100, "max_memory_mib": 100_000, "max_disk_gib": 1000}
    )


def _up(name: str, memory_mib: int = 4096, **fields):
    now = timezone.now()
    return HostFactory(name=name, cpus=4, memory_mib=memory_mib, last_seen_at=now, hostd_seen_at=now, **fields)


def _create(owner, name, template, **kwargs):
    vm, _ = services.vm_create(owner=owner, name=name, template=template, actor=kwargs.pop("actor", owner), **kwargs)
    return vm


def _uefi_template():
    image = ImageFactory(name="uefi-disk", boot_mode="uefi", kernel_path="", initramfs_path="")
    return TemplateFactory(name="uefi", image=image)


def test_a_uefi_vm_goes_only_to_a_host_whose_driver_boots_uefi(owner, operator, sizes):
    _up("ch", memory_mib=16384, driver="cloud-hypervisor", boot_modes=["kernel"])
    _up("qemu", memory_mib=2048, driver="qemu", boot_modes=["kernel", "uefi"])
    template = _uefi_template()
    assert _create(owner, "a", template).host.name == "qemu"  # the roomier host cannot boot it
    assert _create(owner, "b", TemplateFactory()).host.name == "ch"  # a kernel-boot VM goes anywhere

    with pytest.raises(ConflictError) as err:  # an operator pinning it to a host that cannot
        _create(owner, "c", template, host="ch", actor=operator)
    assert err.value.code == "no_host"
    assert err.value.details == {"boot_mode": "uefi", "hosts": {"ch": "cloud-hypervisor"}}


def test_no_host_booting_the_image_is_a_409_no_host_that_says_why(owner, sizes):
    _up("ch1", driver="cloud-hypervisor", boot_modes=["kernel"])
    _up("ch2", driver="cloud-hypervisor", boot_modes=["kernel"])
    with pytest.raises(ConflictError) as err:
        _create(owner, "a", _uefi_template())
    assert err.value.code == "no_host"
    assert "needs uefi boot" in err.value.message
    assert err.value.details["hosts"] == {"ch1": "cloud-hypervisor", "ch2": "cloud-hypervisor"}


def test_among_equally_roomy_hosts_one_holding_the_image_is_preferred_but_others_are_not_refused(
    owner, sizes, image_dir
):
    image = _kernel_image(image_dir)
    template = TemplateFactory(name="small", image=image)
    _up("a-lacks", memory_mib=4096)
    holder = _up("b-holds", memory_mib=4096)
    HostImage.objects.create(host=holder, image=image, status=HostImage.Status.PRESENT)
    # Same room: the holder, though "a-lacks" sorts first by name.
    assert _create(owner, "one", template).host.name == "b-holds"
    # Now the other can take one more VM of this size: it gets the next (the image is copied there).
    assert _create(owner, "two", template).host.name == "a-lacks"
    # A corrupt copy does not count as holding it.
    HostImage.objects.filter(host=holder).update(status=HostImage.Status.CORRUPT)
    _up("c-roomier", memory_mib=8192)
    assert _create(owner, "three", template).host.name == "c-roomier"


def test_operators_see_per_host_which_images_it_holds(api, owner, operator, image_dir):
    host = _up("h1", driver="qemu", boot_modes=["kernel", "uefi"])
    image = _kernel_image(image_dir)
    inventory.host_inventory_update(host)
    assert api.as_user(owner).get(f"/api/v1/hosts/{host.pk}/").status_code == 404
    body = api.as_user(operator).get(f"/api/v1/hosts/{host.pk}/").json()
    assert body["boot_modes"] == ["kernel", "uefi"]
    assert body["images"] == [
        {
            "id": str(image.pk),
            "name": "small",
            "status": "present",
            "sha256": image.file_sha256,
            "error": "",
            "verified_at": body["images"][0]["verified_at"],
        }
    ]
    listed = {row["name"]: row for row in api.as_user(operator).get("/api/v1/hosts/").json()}
    assert [i["name"] for i in listed["h1"]["images"]] == ["small"]


def test_the_hosts_page_shows_what_each_host_boots_and_which_images_it_holds(client, operator, image_dir):
    host = _up("h1", driver="qemu", boot_modes=["kernel", "uefi"])
    _kernel_image(image_dir)
    (image_dir / "d1" / "vmlinuz").write_bytes(b"tampered")
    inventory.host_inventory_update(host)
    client.login(username=operator.username, password=PASSWORD)
    page = client.get("/hosts/").content.decode()
    assert "boots: kernel, uefi" in page
    assert 'data-status="corrupt"' in page and "small (corrupt)" in page


def test_the_admin_shows_the_images_a_host_holds(client, admin_user, image_dir):
    host = _up("h1", driver="qemu", boot_modes=["kernel"])
    _kernel_image(image_dir)
    inventory.host_inventory_update(host)
    client.force_login(admin_user)
    page = client.get(f"/admin/vms/host/{host.pk}/change/").content.decode()
    assert "Host images" in page and "small" in page and "Present (verified)" in page


def test_a_move_or_drain_goes_only_to_a_host_running_the_vms_driver_and_boot_mode(two, owner, operator, fake):  # noqa: F811
    from vms import hosts
    from vms.moves import vm_move

    vm = _vm_on_h1(two, "stopped", owner)
    assert vm.driver == "fake"
    Host.objects.filter(name="h2").update(driver="qemu", boot_modes=["kernel", "uefi"])
    with pytest.raises(ConflictError) as err:  # its disk and firmware state are the fake driver's
        vm_move(vm=vm, host=Host.objects.get(name="h2"), actor=operator)
    assert err.value.code == "no_host" and err.value.details["driver"] == "fake"
    result = hosts.host_drain(host=two.hosts["h1"], actor=operator)
    assert result["moves"] == [] and result["stays"][0]["code"] == "no_host"

    Host.objects.filter(name="h2").update(driver="fake", boot_modes=["kernel"])
    Image.objects.filter(pk=vm.boot_image.pk).update(boot_mode="uefi")
    vm.refresh_from_db()
    with pytest.raises(ConflictError) as err:
        vm_move(vm=vm, host=Host.objects.get(name="h2"), actor=operator)
    assert err.value.code == "no_host" and err.value.details["boot_mode"] == "uefi"
    assert not Operation.objects.filter(action="move").exists()


def test_a_row_recorded_by_another_process_between_the_read_and_the_insert_is_updated(image_dir, monkeypatch):
    """A create's image check and the worker's inventory pass (or two creates) record the same
    host's copy at once: the read found no row, the other committed one before the insert. The
    create failed on the unique constraint ("Operation lost while creating")."""
    host = HostFactory(name="h1")
    image = _kernel_image(image_dir)
    HostImage.objects.create(host=host, image=image, status=HostImage.Status.UNVERIFIED, files={})
    real_first = type(HostImage.objects.all()).first
    reads = []

    def first_missing_once(queryset):
        reads.append(1)
        return None if len(reads) == 1 else real_first(queryset)  # the other's row not yet there

    monkeypatch.setattr(type(HostImage.objects.all()), "first", first_missing_once)
    row = inventory.host_image_record(host=host, image=image, status=HostImage.Status.PRESENT, files={"k": 1})
    monkeypatch.undo()
    assert len(reads) == 2
    assert HostImage.objects.filter(host=host, image=image).count() == 1
    assert HostImage.objects.get(host=host, image=image).status == HostImage.Status.PRESENT == row.status
