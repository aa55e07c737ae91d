"""Golden snapshots with the cloud-hypervisor driver, against the fake VMM (which enforces
CH's API rules from the OpenAPI spec): the builder boots, CH's snapshot becomes the golden
snapshot, a create restores it into a VMM of its own, and a corrupt one falls back to a
cold boot. The guest agent is a stand-in that answers while the VMM runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox_site.errors import ApplicationError
from snapshots.golden import golden_build
from snapshots.models import GoldenSnapshot
from tests.factories import ImageFactory, TemplateFactory
from tests.vmm.test_cloud_hypervisor import FAKE_BIN, images, short_dir  # noqa: F401 - fixtures
from tests.vms.conftest import run_ops  # noqa: F401 - fixture
from vms import agent_gateway, hypervisor
from vms import services as vm_services
from vms.models import Operation, VmState
from vms.vmm.base import RuntimeState
from vms.vmm.cloud_hypervisor import CloudHypervisorDriver

pytestmark = pytest.mark.django_db


@pytest.fixture
def ch(settings, short_dir, images, monkeypatch):  # noqa: F811
    # The VMMs' runtime directories directly under short_dir: its teardown kills what is left.
    settings.SANDBOX_RUNTIME_DIR = short_dir
    settings.SANDBOX_SNAPSHOT_DIR = short_dir / "snapshots"
    settings.SANDBOX_NETWORKING = False
    settings.SANDBOX_NETNS = ""  # no network devices at all; VMMs in this test's own namespace
    settings.SANDBOX_STOP_TIMEOUT = 0.1
    driver = CloudHypervisorDriver(binary=str(FAKE_BIN))
    real_driver_for = hypervisor.driver_for
    monkeypatch.setattr(hypervisor, "driver_name_select", lambda: "cloud-hypervisor")
    monkeypatch.setattr(
        hypervisor, "driver_for", lambda name: driver if name == "cloud-hypervisor" else real_driver_for(name)
    )
    identities: dict[str, dict] = {}

    def alive(vm) -> bool:
        return driver.info(hypervisor.vm_spec(vm)).state == RuntimeState.RUNNING

    def agent_wait(vm, *, timeout: float) -> dict:
        if not alive(vm):
            raise ApplicationError("The guest agent did not answer.", code="agent_unavailable", status_code=503)
        return {"agent_version": "stand-in"}

    def agent_call(vm, op, args=None, data=b"", *, timeout: float = 30.0):
        if not alive(vm):
            raise ApplicationError("The guest agent did not answer.", code="agent_unavailable", status_code=503)
        if op == "identity_set":
            identities[str(vm.pk)] = dict(args or {})
        return {"applied": sorted((args or {}).keys())}, b""

    monkeypatch.setattr(agent_gateway, "agent_wait", agent_wait)
    monkeypatch.setattr(agent_gateway, "agent_call", agent_call)
    kernel, base = images
    image = ImageFactory(name="ch-image", kernel_path=str(kernel), initramfs_path="", rootfs_path=str(base))
    template = TemplateFactory(name="ch-template", image=image, memory_mib=256, max_memory_mib=512)
    yield driver, template, identities


def test_a_create_restores_the_cloud_hypervisor_golden_snapshot(ch, owner, run_ops):  # noqa: F811
    driver, template, identities = ch
    golden = golden_build(template=template, actor=None)
    run_ops()
    golden.refresh_from_db()
    assert golden.status == GoldenSnapshot.Status.READY, golden.error
    assert golden.snapshot.driver == "cloud-hypervisor"
    assert {"config.json", "state.json"} <= set(golden.snapshot.files)
    vm, op = vm_services.vm_create(owner=owner, name="ch-gold", template=template, actor=owner)
    run_ops()
    op.refresh_from_db()
    vm.refresh_from_db()
    assert op.action == "clone" and op.status == Operation.Status.SUCCEEDED, op.log
    assert "golden snapshot not used" not in op.log
    assert vm.state == VmState.RUNNING and vm.driver == "cloud-hypervisor"
    assert identities[str(vm.pk)]["hostname"] == "ch-gold"
    assert identities[str(vm.pk)]["machine_id"] == vm.pk.hex

    (Path(golden.snapshot.directory) / "state.json").write_text("{}")  # corrupt it
    cold, op = vm_services.vm_create(owner=owner, name="ch-cold", template=template, actor=owner)
    run_ops()
    op.refresh_from_db()
    cold.refresh_from_db()
    assert op.status == Operation.Status.SUCCEEDED, op.log
    assert "golden snapshot not used: it failed verification" in op.log and "cold boot instead" in op.log
    assert cold.state == VmState.RUNNING
