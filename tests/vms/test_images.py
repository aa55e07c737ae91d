"""Images as first-class objects: upload and registration with their checks (checksum,
``qemu-img info``: format, backing files, size; "is it a disk"), each refusal leaving nothing
behind; listing by visibility, deprecation, deletion refused while in use; VMs on a picked image."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from accounts.models import AuditEvent
from tests.factories import ImageFactory, TemplateFactory, VmFactory
from vms.models import Image

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("sgdisk") is None, reason="qemu-img, sgdisk"),
]

MIB = 1 << 20


@pytest.fixture
def store(settings, tmp_path) -> Path:
    settings.SANDBOX_IMAGE_STORE = tmp_path / "store"
    settings.SANDBOX_IMAGE_IMPORT_DIR = tmp_path / "import"
    settings.SANDBOX_IMAGE_IMPORT_DIR.mkdir()
    return settings.SANDBOX_IMAGE_STORE


@pytest.fixture
def gpt_disk(tmp_path) -> Path:
    """A small raw disk with a GPT and an EFI system partition (what a UEFI image is)."""
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as fh:
        fh.truncate(8 * MIB)
    subprocess.run(["sgdisk", "--new=1:2048:0", "--typecode=1:ef00", str(disk)], check=True, capture_output=True)
    return disk


@pytest.fixture
def qcow2_disk(gpt_disk, tmp_path) -> Path:
    out = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(gpt_disk), str(out)], check=True)
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def upload(api, user, path: Path, **fields):
    body = {
        "name": "my-image",
        "sha256": sha(path),
        "disk_format": "qcow2" if path.suffix == ".qcow2" else "raw",
        "boot_mode": "uefi",
        **fields,
        "file": SimpleUploadedFile(path.name, path.read_bytes()),
    }
    return api.as_user(user).post("/api/v1/images/", body, format="multipart")


def assert_nothing_left(store: Path) -> None:
    assert not Image.objects.filter(name="my-image").exists()
    assert not store.exists() or list(store.iterdir()) == []


def test_an_operator_uploads_a_good_qcow2(api, operator, store, qcow2_disk):
    response = upload(api, operator, qcow2_disk, os_type="linux", min_memory_mib=512, description="mine")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["sha256"] == sha(qcow2_disk) and body["status"] == "ready" and body["source"] == "uploaded"
    assert (body["boot_mode"], body["disk_format"], body["virtual_size_bytes"]) == ("uefi", "qcow2", 8 * MIB)
    image = Image.objects.get(name="my-image")
    disk = Path(image.rootfs_path)
    assert disk.parent == store and disk.read_bytes() == qcow2_disk.read_bytes()
    assert oct(disk.stat().st_mode & 0o777) == "0o444"
    assert AuditEvent.objects.filter(action="image.uploaded", actor_id=operator.pk).exists()


def test_a_raw_gpt_disk_is_accepted(api, operator, store, gpt_disk):
    assert upload(api, operator, gpt_disk).status_code == 201


def test_a_wrong_checksum_is_refused(api, operator, store, qcow2_disk):
    response = upload(api, operator, qcow2_disk, sha256="0" * 64)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "checksum_mismatch"
    assert_nothing_left(store)


def test_a_backing_file_outside_the_store_is_refused(api, operator, store, tmp_path):
    hostile = tmp_path / "hostile.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/shadow", "-F", "raw", str(hostile), "8M"],
        check=True,
    )
    response = upload(api, operator, hostile)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "image_backing_file" and "backing file" in error["message"]
    assert error["details"]["backing_file"] == "/etc/shadow"
    assert_nothing_left(store)


def test_an_oversized_image_is_refused(api, operator, store, qcow2_disk, settings):
    settings.SANDBOX_IMAGE_MAX_VIRTUAL_BYTES = 4 * MIB
    response = upload(api, operator, qcow2_disk)
    assert response.status_code == 413 and response.json()["error"]["code"] == "image_too_large"
    assert_nothing_left(store)
    settings.SANDBOX_IMAGE_MAX_UPLOAD_BYTES = 1000  # the file itself, counted while it is written
    response = upload(api, operator, qcow2_disk)
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_large"
    assert_nothing_left(store)


def test_a_non_image_file_is_refused(api, operator, store, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_bytes(b"just some text, not a disk\n" * 100)
    response = upload(api, operator, text)
    assert response.status_code == 400 and response.json()["error"]["code"] == "image_not_an_image"
    assert_nothing_left(store)


def test_a_qcow2_declared_as_raw_is_refused(api, operator, store, qcow2_disk):
    response = upload(api, operator, qcow2_disk, disk_format="raw")
    assert response.status_code == 400 and response.json()["error"]["code"] == "image_format_mismatch"
    assert_nothing_left(store)


def test_other_formats_are_refused(api, operator, store, gpt_disk, tmp_path):
    vmdk = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "convert", "-O", "vmdk", str(gpt_disk), str(vmdk)], check=True)
    response = upload(api, operator, vmdk, disk_format="qcow2")
    assert response.status_code == 400 and response.json()["error"]["code"] == "image_format"
    assert_nothing_left(store)


def test_users_cannot_upload(api, owner, store, qcow2_disk):
    response = upload(api, owner, qcow2_disk)
    assert response.status_code == 403
    assert_nothing_left(store)


def test_registering_takes_only_files_of_the_import_directory(api, operator, store, qcow2_disk, settings):
    imported = settings.SANDBOX_IMAGE_IMPORT_DIR / "win.qcow2"
    shutil.copyfile(qcow2_disk, imported)
    client = api.as_user(operator)
    base = {"sha256": sha(qcow2_disk), "disk_format": "qcow2", "boot_mode": "uefi"}
    for path in ("/etc/passwd", "../disk.qcow2", "missing.qcow2"):
        response = client.post("/api/v1/images/", {**base, "name": "my-image", "path": path}, format="json")
        assert response.status_code in (400, 404), (path, response.content)
    (settings.SANDBOX_IMAGE_IMPORT_DIR / "link.qcow2").symlink_to(qcow2_disk)
    response = client.post("/api/v1/images/", {**base, "name": "my-image", "path": "link.qcow2"}, format="json")
    assert response.status_code == 404, response.content
    assert_nothing_left(store)
    response = client.post("/api/v1/images/", {**base, "name": "my-image", "path": "win.qcow2"}, format="json")
    assert response.status_code == 201 and response.json()["source"] == "registered"
    assert imported.exists()  # copied, not moved


def test_uploading_fills_the_windows_image_waiting_for_a_disk(api, operator, store, qcow2_disk):
    waiting = Image.objects.get(name="windows")  # from the migration, with the windows-default template
    assert waiting.status == "missing" and waiting.templates.filter(name="windows-default").exists()
    response = upload(api, operator, qcow2_disk, name="windows", os_type="windows", min_disk_gib=32)
    assert response.status_code == 201, response.content
    waiting.refresh_from_db()
    assert waiting.status == "ready" and waiting.sha256 == sha(qcow2_disk) and waiting.min_disk_gib == 32
    assert upload(api, operator, qcow2_disk, name="windows").status_code == 409  # taken now


def test_users_list_public_images_and_shared_private_ones(api, owner, stranger, operator):
    ImageFactory(name="public-one")
    private = ImageFactory(name="private-one", is_public=False)
    ImageFactory(name="old-one", deprecated_at="2026-01-01T00:00:00Z")
    from guardian.shortcuts import assign_perm

    assign_perm("vms.view_image", owner, private)

    def names(user, query=""):
        return {i["name"] for i in api.as_user(user).get(f"/api/v1/images/{query}").json()["results"]}

    assert {"public-one", "private-one"} <= names(owner) and "old-one" not in names(owner)
    assert "private-one" not in names(stranger) and "public-one" in names(stranger)
    assert "private-one" in names(operator)
    assert "old-one" in names(owner, "?all=1")


def test_a_vm_boots_the_image_it_picked(api, owner, settings):
    TemplateFactory()
    uefi = ImageFactory(name="uefi-linux", boot_mode="uefi", disk_format="qcow2", rootfs_path="/store/x.qcow2")
    response = api.as_user(owner).post(
        "/api/v1/vms/", {"name": "web-1", "template": "test-template", "image": "uefi-linux", "start": False},
        format="json",
    )  # fmt: skip
    assert response.status_code == 202, response.content
    assert response.json()["image"] == "uefi-linux"
    from vms.hypervisor import vm_spec
    from vms.models import VM

    settings.SANDBOX_VIRTIO_WIN_ISO = "/isos/virtio-win.iso"
    spec = vm_spec(VM.objects.get(name="web-1"))
    assert (spec.boot_mode, spec.base_format, str(spec.base_image), spec.cdroms) == (
        "uefi",
        "qcow2",
        uefi.rootfs_path,
        (),
    )


def test_windows_vms_get_the_virtio_driver_iso(owner, settings):
    from vms.hypervisor import vm_spec

    settings.SANDBOX_VIRTIO_WIN_ISO = "/isos/virtio-win.iso"
    image = ImageFactory(name="win", os_type="windows", boot_mode="uefi", disk_format="qcow2")
    spec = vm_spec(VmFactory(owner=owner, name="w", image=image))
    assert (spec.os_type, spec.cdroms) == ("windows", ("/isos/virtio-win.iso",))


def test_new_vms_refuse_deprecated_missing_and_too_small_images(api, owner):
    TemplateFactory()
    ImageFactory(name="old", deprecated_at="2026-01-01T00:00:00Z")
    ImageFactory(name="big", min_memory_mib=4096)
    ImageFactory(name="hidden", is_public=False)
    client = api.as_user(owner)

    def create(**fields):
        body = {"name": "vm-x", "template": "test-template", "start": False, **fields}
        return client.post("/api/v1/vms/", body, format="json")

    assert create(image="old").status_code == 409
    assert create(image="big").status_code == 400
    assert create(image="hidden").status_code == 404
    assert create(template="windows-default").status_code == 409  # its image has no disk yet


def test_deleting_an_image_in_use_is_refused(api, operator, owner, store, qcow2_disk):
    assert upload(api, operator, qcow2_disk).status_code == 201
    image = Image.objects.get(name="my-image")
    vm = VmFactory(owner=owner, name="uses-it", image=image)
    client = api.as_user(operator)
    response = client.delete(f"/api/v1/images/{image.pk}/")
    assert response.status_code == 409 and response.json()["error"]["details"]["vms"] == [str(vm.pk)]
    vm.delete()
    template = TemplateFactory(name="on-it", image=image)
    assert client.delete(f"/api/v1/images/{image.pk}/").status_code == 409
    template.delete()
    disk = Path(image.rootfs_path)
    assert client.delete(f"/api/v1/images/{image.pk}/").status_code == 204
    assert not disk.exists() and not Image.objects.filter(pk=image.pk).exists()


def test_deprecating_keeps_existing_users_working(api, operator, owner):
    image = ImageFactory(name="aging")
    vm = VmFactory(owner=owner, name="old-vm", image=image)
    response = api.as_user(operator).post(f"/api/v1/images/{image.pk}/deprecate/", {}, format="json")
    assert response.status_code == 200 and response.json()["deprecated"] is True
    vm.refresh_from_db()
    assert vm.boot_image == image
    response = api.as_user(operator).post(f"/api/v1/images/{image.pk}/deprecate/", {"deprecated": False})
    assert response.json()["deprecated"] is False


def test_the_admin_uploads_through_the_same_checks(client, admin_user, store, qcow2_disk, tmp_path):
    from tests.factories import PASSWORD

    client.login(username=admin_user.username, password=PASSWORD)
    text = tmp_path / "notes.txt"
    text.write_bytes(b"not a disk" * 100)
    form = {"name": "my-image", "sha256": sha(text), "disk_format": "raw", "boot_mode": "uefi", "os_type": "linux",
            "min_disk_gib": 1, "min_memory_mib": 256, "is_public": "on", "description": ""}  # fmt: skip
    with open(text, "rb") as fh:
        response = client.post("/admin/vms/image/add/", {**form, "disk": fh}, follow=True)
    assert b"Image refused" in response.content
    assert_nothing_left(store)
    form["sha256"] = sha(qcow2_disk)
    form["disk_format"] = "qcow2"
    with open(qcow2_disk, "rb") as fh:
        response = client.post("/admin/vms/image/add/", {**form, "disk": fh}, follow=True)
    assert response.status_code == 200
    assert Image.objects.get(name="my-image").status == "ready"


def test_build_image_uefi_records_the_firmware_image_and_template(monkeypatch, tmp_path, gpt_disk):
    import json

    from vms import services
    from vms.vmm import image_uefi

    manifest = {"sha256": sha(gpt_disk)}
    (gpt_disk.parent / "manifest.json").write_text(json.dumps(manifest))
    art = image_uefi.UefiImageArtifacts(disk=gpt_disk, digest="d" * 64, base=None)  # type: ignore[arg-type]
    monkeypatch.setattr(image_uefi, "build_uefi_image", lambda out_dir, progress: art)
    image = services.image_build_uefi(progress=print)
    assert (image.name, image.boot_mode, image.status, image.rootfs_path) == (
        "linux-uefi",
        "uefi",
        "ready",
        str(gpt_disk),
    )
    assert image.sha256 == manifest["sha256"]
    assert image.templates.get().name == "linux-uefi"


def test_clones_boot_the_image_their_snapshot_was_taken_on(owner, operator):
    from sandbox_site.errors import ConflictError
    from snapshots.services import snapshot_clone
    from tests.factories import SnapshotFactory
    from vms.images import image_delete

    image = ImageFactory(name="uefi-img", boot_mode="uefi")
    source = VmFactory(owner=owner, name="src", image=image)
    snapshot = SnapshotFactory(vm=source, image=image)
    [(clone, _)] = snapshot_clone(snapshot=snapshot, actor=owner)
    assert clone.boot_image == image
    clone.delete()
    source.delete()
    with pytest.raises(ConflictError) as exc:  # the snapshot still needs it: its clones would boot it
        image_delete(image=image, actor=operator)
    assert exc.value.details["snapshots"] == [str(snapshot.pk)]


def test_an_image_upload_over_the_limit_is_refused_before_it_is_read(settings):
    import asyncio

    from vms.upload_limit import UploadLimitMiddleware

    settings.SANDBOX_IMAGE_MAX_UPLOAD_BYTES = 1000
    called, sent = [], []

    async def app(scope, receive, send):
        called.append(scope["path"])

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    def scope(method, path, length):
        return {"type": "http", "method": method, "path": path, "headers": [(b"content-length", length)]}

    middleware = UploadLimitMiddleware(app)
    asyncio.run(middleware(scope("POST", "/api/v1/images/", b"5000"), receive, send))
    assert not called and sent[0]["status"] == 413
    asyncio.run(middleware(scope("POST", "/api/v1/images/", b"500"), receive, send))
    asyncio.run(middleware(scope("GET", "/api/v1/images/", b"5000"), receive, send))
    assert called == ["/api/v1/images/", "/api/v1/images/"]


def test_the_dashboard_create_form_offers_the_images_a_user_may_pick(client, owner, django_capture_on_commit_callbacks):
    from tests.factories import PASSWORD

    TemplateFactory()
    ImageFactory(name="picked", boot_mode="uefi")
    ImageFactory(name="hidden-one", is_public=False)
    ImageFactory(name="old-one", deprecated_at="2026-01-01T00:00:00Z")
    client.login(username=owner.username, password=PASSWORD)
    page = client.get("/vms/new/").content.decode()
    assert 'value="picked"' in page and "hidden-one" not in page and "old-one" not in page
    with django_capture_on_commit_callbacks(execute=False):
        response = client.post("/vms/new/", {"name": "web", "template": "test-template", "image": "picked"})
    assert response.status_code == 302
    from vms.models import VM

    assert VM.objects.get(name="web").boot_image.name == "picked"


def test_a_vm_on_a_picked_uefi_image_goes_through_the_lifecycle(fake, owner, run_ops):
    """Create -> running through the operations and the (fake) driver: the spec the driver
    launched says firmware boot and the image's disk."""
    from vms import services
    from vms.models import VM
    from vms.vmm.base import VmSpec

    template = TemplateFactory()
    image = ImageFactory(name="uefi-disk", boot_mode="uefi", disk_format="qcow2", rootfs_path="/store/u.qcow2")
    vm, _ = services.vm_create(owner=owner, actor=owner, name="fw", template=template, image=image)
    run_ops()
    vm = VM.objects.get(pk=vm.pk)
    assert vm.state == "running", (vm.state, vm.last_error)
    spec = VmSpec.from_json((fake.runtime / str(vm.pk) / "spec.json").read_text())
    assert (spec.boot_mode, spec.base_format, str(spec.base_image)) == ("uefi", "qcow2", "/store/u.qcow2")


def test_the_admin_refuses_to_delete_an_image_in_use(client, admin_user):
    from tests.factories import PASSWORD

    image = ImageFactory(name="busy")
    TemplateFactory(name="uses-busy", image=image)
    client.login(username=admin_user.username, password=PASSWORD)
    response = client.post(f"/admin/vms/image/{image.pk}/delete/", {"post": "yes"}, follow=True)
    assert response.status_code == 200 and b"Cannot delete image" in response.content  # PROTECT, before our rule
    assert Image.objects.filter(pk=image.pk).exists()
