"""Deleting neighbouring snapshots of one chain at once: the deletes are serialized, so the
second sees the first (409 ``snapshot_busy``) instead of both ending up ``deleting`` with one
layer merged into a layer that is being removed (issue 14)."""

from __future__ import annotations

import threading

import pytest
from django.db import close_old_connections

from sandbox_site.errors import ConflictError
from snapshots import services
from snapshots.models import Snapshot
from tests.factories import SnapshotFactory, VmFactory

D = Snapshot.State.DELETING


def _chain(owner):
    vm = VmFactory(owner=owner, state="stopped")
    parent = SnapshotFactory(vm=vm, name="parent")
    child = SnapshotFactory(vm=vm, name="child", parent=parent)
    return parent, child


@pytest.mark.django_db
def test_a_parent_is_not_merged_into_a_child_being_deleted(owner):
    parent, child = _chain(owner)
    services.snapshot_delete(snapshot=child, actor=owner)
    with pytest.raises(ConflictError) as err:
        services.snapshot_delete(snapshot=parent, actor=owner)
    assert err.value.code == "snapshot_busy"
    parent.refresh_from_db()
    assert parent.state == Snapshot.State.READY


@pytest.mark.django_db
def test_a_child_is_not_deleted_while_its_parent_merges_into_it(owner):
    parent, child = _chain(owner)
    services.snapshot_delete(snapshot=parent, actor=owner)
    with pytest.raises(ConflictError) as err:
        services.snapshot_delete(snapshot=child, actor=owner)
    assert err.value.code == "snapshot_busy"


@pytest.mark.django_db(transaction=True)
def test_concurrent_deletes_of_neighbours_never_leave_both_deleting(owner):
    for _ in range(5):
        parent, child = _chain(owner)
        barrier = threading.Barrier(2)
        outcomes: list[str] = []

        def delete(snapshot):
            try:
                barrier.wait(5)
                services.snapshot_delete(snapshot=snapshot, actor=owner)
                outcomes.append("deleting")
            except ConflictError as exc:
                outcomes.append(exc.code)
            finally:
                close_old_connections()

        threads = [threading.Thread(target=delete, args=(s,)) for s in (parent, child)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        states = set(Snapshot.objects.filter(pk__in=[parent.pk, child.pk]).values_list("state", flat=True))
        assert sorted(outcomes) == ["deleting", "snapshot_busy"], outcomes
        assert states == {D, Snapshot.State.READY}
