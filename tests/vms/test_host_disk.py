"""New work is refused with 507 before the host's disk is full (vms/host_disk.py)."""

from __future__ import annotations

import pytest

from sandbox_site.errors import ApplicationError
from snapshots import services as snapshot_services
from tests.factories import SnapshotFactory, TemplateFactory
from vms import exec_services, services
from vms.host_disk import require_disk_space
from vms.models import VM


@pytest.fixture
def full_disk(settings):
    settings.SANDBOX_DISK_RESERVE_PERCENT = 100  # no filesystem has that much free


def _assert_507(call) -> None:
    with pytest.raises(ApplicationError) as err:
        call()
    assert (err.value.code, err.value.status_code) == ("insufficient_storage", 507)


def test_it_passes_with_room_to_spare(settings) -> None:
    settings.SANDBOX_DISK_RESERVE_PERCENT = 0
    settings.SANDBOX_DISK_RESERVE_BYTES = 0
    require_disk_space(action="test")


def test_create_answers_507_with_the_api_error_shape(api, owner, full_disk) -> None:
    template = TemplateFactory()
    api.as_user(owner)
    response = api.post("/api/v1/vms/", {"name": "new", "template": template.name}, format="json")
    assert response.status_code == 507, response.content
    assert response.json()["error"]["code"] == "insufficient_storage"
    assert not VM.objects.filter(name="new").exists()


def test_start_snapshot_clone_and_upload_are_refused(owner, vm, full_disk) -> None:
    VM.objects.filter(pk=vm.pk).update(state="stopped")
    vm.refresh_from_db()
    _assert_507(lambda: services.vm_action(vm=vm, action="start", actor=owner))
    _assert_507(lambda: snapshot_services.snapshot_create(vm=vm, actor=owner, name="s"))
    snapshot = SnapshotFactory(vm=vm)
    _assert_507(lambda: snapshot_services.snapshot_clone(snapshot=snapshot, actor=owner))
    VM.objects.filter(pk=vm.pk).update(state="running")
    vm.refresh_from_db()
    _assert_507(lambda: exec_services.vm_file_upload(vm=vm, actor=owner, path="/x", chunks=[b"x"]))
