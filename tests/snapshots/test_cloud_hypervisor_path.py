"""The snapshot path for cloud-hypervisor, against the fake VMM (which enforces CH's rules
from the OpenAPI spec): pause -> vm.snapshot -> overlay copy -> resume, manifest, restore
into a second VMM with its own sockets, and an integrity refusal."""

from __future__ import annotations

import pytest

from tests.vmm.test_cloud_hypervisor import driver, images, make_spec, short_dir  # noqa: F401 - fixtures
from vms.vmm.base import RuntimeState
from vms.vmm.snapshot import SnapshotIntegrityError, SnapshotMeta, manifest_verify, manifest_write


def test_cloud_hypervisor_snapshot_restore_and_integrity(driver, images, short_dir):  # noqa: F811
    spec = make_spec(short_dir, images, "orig")
    driver.prepare(spec)
    driver.launch(spec, timeout=20)
    dest = short_dir / "snap"
    meta = driver.snapshot(spec, dest, include_memory=True)
    assert meta.driver == "cloud-hypervisor" and meta.vmm_version
    assert driver.info(spec).state is RuntimeState.RUNNING  # resumed after the snapshot
    checksum = manifest_write(dest)
    files = manifest_verify(dest, expected_checksum=checksum)
    assert {"config.json", "state.json", "overlay.qcow2", "snapshot.json"} <= set(files)
    assert SnapshotMeta.read(dest).include_memory

    clone = make_spec(short_dir, images, "clone")
    result = driver.restore(clone, dest, timeout=20)
    assert result.pid != driver.info(spec).pid
    assert driver.info(clone).state is RuntimeState.RUNNING
    assert driver.info(spec).state is RuntimeState.RUNNING  # the original keeps running beside it

    (dest / "state.json").write_text("{}")
    with pytest.raises(SnapshotIntegrityError) as err:
        manifest_verify(dest, expected_checksum=checksum)
    assert "state.json" in err.value.message
    driver.cleanup(clone)
    driver.cleanup(spec)
