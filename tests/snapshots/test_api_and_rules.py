"""Snapshot API permissions, deletion rules and retention, without VMs (rows only)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from guardian.shortcuts import assign_perm

from accounts.models import AuditEvent
from snapshots import services
from snapshots.models import RetentionPolicy, Snapshot, VmLineage
from tests.factories import SnapshotFactory
from vms.models import Operation


def _snap(vm, name, *, parent=None, age_days=0, state=Snapshot.State.READY):
    return SnapshotFactory(
        vm=vm, name=name, parent=parent, state=state, created_at=timezone.now() - timedelta(days=age_days)
    )


@pytest.fixture
def snap(vm):
    return _snap(vm, "s1")


def test_it_lists_and_shows_snapshots_to_the_owner(api, owner, vm, snap):
    client = api.as_user(owner)
    body = client.get(f"/api/v1/snapshots/?vm={vm.pk}").json()
    assert [s["name"] for s in body["results"]] == ["s1"]
    detail = client.get(f"/api/v1/snapshots/{snap.pk}/").json()
    assert detail["children"] == [] and detail["vm"] == str(vm.pk)
    assert client.get(f"/api/v1/vms/{vm.pk}/snapshots/").json()[0]["id"] == str(snap.pk)


# Who may see and act on snapshots: tests/accounts/test_permission_matrix.py (TestSnapshotEndpoints).


def test_a_snapshot_grantee_can_restore(api, grantee, vm, snap):
    assign_perm("vms.view_vm", grantee, vm)
    assign_perm("vms.snapshot_vm", grantee, vm)
    response = api.as_user(grantee).post(f"/api/v1/snapshots/{snap.pk}/restore/")
    assert response.status_code == 202, response.content
    op = Operation.objects.get(pk=response.json()["id"])
    assert op.action == "restore" and op.params["previous_state"] == "stopped"
    vm.refresh_from_db()
    assert vm.state == "starting"
    assert AuditEvent.objects.filter(action="snapshot.restore", result="ok", actor_id=grantee.pk).exists()


def test_a_memory_snapshot_of_a_stopped_vm_is_refused(api, owner, vm):
    response = api.as_user(owner).post(f"/api/v1/vms/{vm.pk}/snapshots/", {"name": "m"}, format="json")
    assert response.status_code == 409 and response.json()["error"]["code"] == "vm_stopped"
    ok = api.as_user(owner).post(
        f"/api/v1/vms/{vm.pk}/snapshots/", {"name": "d", "include_memory": False}, format="json"
    )
    assert ok.status_code == 202, ok.content
    assert Operation.objects.get(pk=ok.json()["operation"]).action == "snapshot"
    dup = api.as_user(owner).post(
        f"/api/v1/vms/{vm.pk}/snapshots/", {"name": "d2", "include_memory": False}, format="json"
    )
    assert dup.status_code == 409  # one snapshot at a time per VM


def test_deleting_a_snapshot_others_depend_on_is_refused_with_their_names(api, owner, vm, snap):
    child = _snap(vm, "s2", parent=snap)
    _snap(vm, "s3", parent=child)
    vm.state = "running"
    vm.save()
    VmLineage.objects.create(vm=vm, snapshot=Snapshot.objects.get(name="s3"))
    response = api.as_user(owner).delete(f"/api/v1/snapshots/{snap.pk}/")
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "snapshot_in_use" and "'s2'" in error["message"]
    leaf_vm = api.as_user(owner).delete(f"/api/v1/snapshots/{Snapshot.objects.get(name='s3').pk}/")
    assert leaf_vm.status_code == 409 and vm.name in leaf_vm.json()["error"]["message"]


def test_a_layer_merges_into_its_only_child_when_nothing_runs_on_it(api, owner, vm, snap):
    child = _snap(vm, "s2", parent=snap)
    VmLineage.objects.create(vm=vm, snapshot=child)  # the VM is stopped
    response = api.as_user(owner).delete(f"/api/v1/snapshots/{snap.pk}/")
    assert response.status_code == 202, response.content
    snap.refresh_from_db()
    assert snap.state == "deleting"
    event = AuditEvent.objects.filter(action="snapshot.delete").latest("id")
    assert event.after["merge_into"] == f"snapshot:{child.pk}"


def test_retention_keeps_the_newest_and_the_young(vm):
    snaps = [_snap(vm, f"s{i}", age_days=10 - i) for i in range(6)]  # s5 newest
    policy = RetentionPolicy(vm=vm, keep_last=2)
    assert [s.name for s in services.retention_expired(snaps, policy, timezone.now())] == ["s3", "s2", "s1", "s0"]
    policy = RetentionPolicy(vm=vm, keep_last=1, keep_days=7)
    # ages 10..5 days: s3 (7d) is at the horizon edge, s4 and s5 are younger.
    expired = {s.name for s in services.retention_expired(snaps, policy, timezone.now())}
    assert expired == {"s0", "s1", "s2", "s3"}
    assert services.retention_expired(snaps, RetentionPolicy(vm=vm), timezone.now()) == snaps[::-1]


def test_retention_apply_deletes_leaves_and_audits_what_it_keeps(vm, owner):
    old = [_snap(vm, f"old{i}", age_days=30) for i in range(3)]  # independent (e.g. after restores)
    _snap(vm, "new", age_days=0)
    RetentionPolicy.objects.create(user=owner, keep_days=7)
    counts = services.retention_apply()
    assert counts == {"deleted": 3, "kept_in_use": 0}
    assert set(Snapshot.objects.filter(state="deleting").values_list("name", flat=True)) == {s.name for s in old}
    assert AuditEvent.objects.filter(action="snapshot.delete", actor_id=None).count() == 3


def test_retention_policies_are_set_through_the_api(api, owner, vm, stranger):
    client = api.as_user(owner)
    response = client.put(f"/api/v1/vms/{vm.pk}/snapshot-retention/", {"keep_last": 3}, format="json")
    assert response.status_code == 200, response.content
    assert client.get(f"/api/v1/vms/{vm.pk}/snapshot-retention/").json()["scope"] == "vm"
    assert AuditEvent.objects.filter(action="snapshot.retention_set").exists()
    assert (
        api.as_user(stranger)
        .put(f"/api/v1/vms/{vm.pk}/snapshot-retention/", {"keep_last": 1}, format="json")
        .status_code
        == 404
    )


def test_snapshot_storage_counts_against_the_disk_limit(owner, vm):
    from vms.selectors import usage_of

    before = usage_of(owner)["disk_gib"]
    _snap(vm, "big").__class__.objects.filter(name="big").update(size_bytes=3 << 30)
    assert usage_of(owner)["disk_gib"] == before + 3
