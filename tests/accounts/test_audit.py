import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from accounts.audit import GENESIS_HASH, audit_chain_verify, audit_record
from accounts.models import AuditEvent
from tests.factories import VmFactory

# Rows join the chain when their transaction commits: these tests commit for real.
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def chain(owner):
    for n in range(5):
        audit_record(actor=owner, action="test.event", object_type="test", object_id=str(n), after={"n": n})
    return list(AuditEvent.objects.order_by("id"))


def test_it_links_each_row_to_the_previous_one(chain):
    assert [row.chain_seq for row in chain] == [1, 2, 3, 4, 5]
    assert chain[0].prev_hash == GENESIS_HASH
    for prev, row in zip(chain, chain[1:], strict=False):
        assert len(row.hash) == 64 and row.prev_hash == prev.hash
    report = audit_chain_verify()
    assert report.ok and report.checked == 5 and report.unsealed == 0


def test_it_detects_an_altered_row(chain, capsys):
    AuditEvent.objects.filter(pk=chain[2].pk).update(after={"n": 999})
    report = audit_chain_verify()
    assert not report.ok
    assert report.broken_id == chain[2].pk
    with pytest.raises(CommandError, match=f"event id {chain[2].pk}"):
        call_command("audit_verify")


def test_it_detects_a_deleted_row(chain):
    AuditEvent.objects.filter(pk=chain[1].pk)._raw_delete(AuditEvent.objects.db)
    report = audit_chain_verify()
    assert not report.ok
    assert report.broken_id == chain[2].pk


def test_it_refuses_updates_and_deletes_through_the_model(chain):
    row = chain[0]
    row.action = "changed"
    with pytest.raises(ValueError):
        row.save()
    with pytest.raises(ValueError):
        row.delete()


def test_it_reports_an_intact_chain(chain, capsys):
    call_command("audit_verify")
    assert "5 events verified" in capsys.readouterr().out


def test_users_see_events_about_their_objects_and_operators_see_all(api, owner, stranger, operator):
    vm = VmFactory(owner=owner)
    api.as_user(owner).patch(f"/api/v1/vms/{vm.pk}/", {"name": "renamed"}, format="json")
    api.as_user(stranger).get("/api/v1/tokens/")
    owner_view = api.as_user(owner).get("/api/v1/audit-events/?action=vm.update").json()["results"]
    assert [e["object_id"] for e in owner_view] == [str(vm.pk)]
    assert api.as_user(stranger).get("/api/v1/audit-events/?action=vm.update").json()["results"] == []
    assert len(api.as_user(operator).get("/api/v1/audit-events/?action=vm.update").json()["results"]) == 1


def test_it_filters_by_actor_object_and_time(api, owner, operator):
    vm = VmFactory(owner=owner)
    api.as_user(owner).patch(f"/api/v1/vms/{vm.pk}/", {"name": "renamed"}, format="json")
    client = api.as_user(operator)
    assert client.get("/api/v1/audit-events/?actor=owner&action=vm.*").json()["count"] == 1
    assert client.get(f"/api/v1/audit-events/?object_id={vm.pk}").json()["count"] >= 1
    assert client.get("/api/v1/audit-events/?since=2999-01-01T00:00:00Z").json()["count"] == 0
    bad = client.get("/api/v1/audit-events/?since=yesterday")
    assert bad.status_code == 400
    assert bad.json()["error"]["details"] == {"since": "yesterday"}


def test_it_records_denied_attempts(api, owner, grantee, vm):
    from guardian.shortcuts import assign_perm

    assign_perm("vms.view_vm", grantee, vm)
    assert api.as_user(grantee).delete(f"/api/v1/vms/{vm.pk}/").status_code == 403
    event = AuditEvent.objects.get(result="denied", action="vm.destroy")
    assert event.actor_id == grantee.pk
    assert event.object_owner_id == owner.pk
