"""Golden snapshots copied between hosts (snapshots.golden): a host without the template's
golden snapshot asks a control-plane worker to copy another up host's current one
(golden_copy_request, golden_copy: the manifest checked against the source's recorded checksum,
every file against the manifest) instead of building one; a copy that does not verify leaves
nothing behind and the host builds its own. Hostds on this machine as in
tests/vms/test_distribution.py ("h2" is the target host), VMs on the fake driver."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.utils import timezone

from accounts.models import AuditEvent
from snapshots.golden import golden_build, golden_copy, golden_maintain
from snapshots.models import GoldenSnapshot
from snapshots.tasks import golden_copy_task
from tests.factories import TemplateFactory
from tests.vms.test_distribution import hosts  # noqa: F401 - the hostds fixture
from vms import services as vm_services
from vms.models import Host, Operation, VmState

pytestmark = pytest.mark.django_db


@pytest.fixture
def golden_on_h1(hosts, settings, run_ops):  # noqa: F811
    """A ready golden snapshot of a template built by h1's worker (this process acting as it)."""
    rows, _image, dirs = hosts
    now = timezone.now()
    Host.objects.filter(name__in=["h1", "h2"]).update(cpus=4, memory_mib=8192, last_seen_at=now, hostd_seen_at=now)
    template = TemplateFactory(name="golden-tpl")
    settings.SANDBOX_HOST_NAME, settings.SANDBOX_SNAPSHOT_DIR = "h1", dirs["h1"]["snap"]
    golden = golden_build(template=template, actor=None, host=rows["h1"])
    run_ops()
    golden.refresh_from_db()
    assert golden.status == GoldenSnapshot.Status.READY, golden.error
    settings.SANDBOX_HOST_NAME, settings.SANDBOX_SNAPSHOT_DIR = "h2", dirs["h2"]["snap"]  # h2's worker again
    return template, golden, rows, dirs


def _as_control_plane(settings, fn, **kwargs):
    settings.SANDBOX_HOST_NAME = "control"  # no host of its own: it relays between hostds
    try:
        return fn(**kwargs)
    finally:
        settings.SANDBOX_HOST_NAME = "h2"


def test_a_host_without_the_golden_snapshot_has_another_hosts_copied_instead_of_building(
    golden_on_h1, owner, operator, run_ops, fake, settings, django_capture_on_commit_callbacks, monkeypatch
):
    template, source, rows, dirs = golden_on_h1
    sent = []
    monkeypatch.setattr(golden_copy_task, "apply_async", lambda **kwargs: sent.append(kwargs))
    with django_capture_on_commit_callbacks(execute=True):
        counts = golden_maintain(host=rows["h2"])
    assert counts["copy_requested"] == 1 and counts["requested"] == 0
    assert sent == [{"args": [str(template.pk), str(rows["h2"].pk)], "queue": settings.SANDBOX_TRANSFER_QUEUE}]
    pending = GoldenSnapshot.objects.get(template=template, host=rows["h2"])
    assert pending.status == GoldenSnapshot.Status.BUILDING and pending.operation is None
    assert golden_maintain(host=rows["h2"])["copy_requested"] == 0  # under way: not asked twice

    copy = _as_control_plane(settings, golden_copy, template=template, host=rows["h2"])
    assert copy.status == GoldenSnapshot.Status.READY and copy.inputs == source.inputs
    assert copy.snapshot.host == rows["h2"] and copy.snapshot.checksum == source.snapshot.checksum
    name = Path(source.snapshot.directory).name
    assert copy.snapshot.directory == str(dirs["h2"]["snap"] / name)
    for file in ["manifest.json", *source.snapshot.files]:
        assert (dirs["h2"]["snap"] / name / file).read_bytes() == (dirs["h1"]["snap"] / name / file).read_bytes()
    assert AuditEvent.objects.get(action="golden.copied").after["source"] == "h1"
    assert Operation.objects.filter(action="golden_build").count() == 1  # h1's: nothing built on h2

    # A create on h2 restores h2's copy (verified again before the restore).
    vm, op = vm_services.vm_create(owner=owner, name="fast", template=template, host="h2", actor=operator)
    run_ops()
    vm.refresh_from_db()
    op.refresh_from_db()
    assert op.action == "clone" and op.params["golden"] == str(copy.pk)
    assert op.status == Operation.Status.SUCCEEDED, op.log
    assert vm.state == VmState.RUNNING
    assert fake.vmm.fake_vm(str(vm.pk)).restored_from == copy.snapshot.directory


def test_a_golden_snapshot_that_does_not_verify_is_not_copied_and_the_host_builds_its_own(
    golden_on_h1, run_ops, settings
):
    template, source, rows, dirs = golden_on_h1
    name = Path(source.snapshot.directory).name
    (dirs["h1"]["snap"] / name / "state.bin").write_bytes(b"rotted")
    assert _as_control_plane(settings, golden_copy, template=template, host=rows["h2"]) is None
    assert not (dirs["h2"]["snap"] / name).exists() or not any((dirs["h2"]["snap"] / name).iterdir())
    assert not AuditEvent.objects.filter(action="golden.copied").exists()
    building = GoldenSnapshot.objects.get(template=template, host=rows["h2"])
    assert building.status == GoldenSnapshot.Status.BUILDING and building.operation is not None
    run_ops()
    built = GoldenSnapshot.objects.get(template=template, host=rows["h2"])
    assert built.status == GoldenSnapshot.Status.READY, built.error
    assert Path(built.snapshot.directory).parent == dirs["h2"]["snap"]
    assert AuditEvent.objects.filter(action="golden.build", after__reason__startswith="not copied: h1").exists()
