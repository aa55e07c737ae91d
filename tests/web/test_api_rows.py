"""The list endpoints that render values() rows (sandbox_site/api_rows.py) answer exactly what
their ModelSerializers answer for the same rows, and the permission filters written for speed
(accounts.permissions.visible_queryset, vms.selectors.operation_list_visible) select exactly the
rows of the definitions they replace."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest
from django.contrib.auth.models import Group
from django.db.models import Q
from django.utils import timezone
from guardian.shortcuts import assign_perm, get_objects_for_user
from rest_framework.renderers import JSONRenderer

from accounts.audit import audit_record
from accounts.models import AuditEvent, AuditResult, Role
from accounts.permissions import visible_queryset
from accounts.serializers import AuditEventSerializer
from sandbox_site.api_rows import RowRenderer
from tests.factories import HostFactory, ImageFactory, TemplateFactory, UserFactory, VmFactory
from vms import selectors
from vms.models import VM, Operation, VmPurpose
from vms.serializers import OperationSerializer, VmSerializer

pytestmark = pytest.mark.django_db


def _json(data):
    return json.loads(JSONRenderer().render(data))


def _varied_rows(owner, grantee):
    """VMs, operations and audit rows with every optional value both set and empty."""
    image = ImageFactory(name="own-image")
    template = TemplateFactory(name="rows-template")
    now = timezone.now()
    vms = [
        VmFactory(owner=owner, template=template, state="running", started_at=now, metadata={"k": ["v", 1]}),
        VmFactory(owner=owner, template=template, image=image, host=None, last_error="boom", last_console="x\n"),
        VmFactory(owner=grantee, template=template, state="paused", created_at=now - timedelta(days=400)),
    ]
    assign_perm("vms.view_vm", grantee, vms[0])
    Operation.objects.create(vm=vms[0], vm_ref=vms[0].pk, vm_owner_id=owner.pk, action="start", requested_by=owner)
    Operation.objects.create(
        vm=None, vm_ref=uuid.uuid4(), vm_owner_id=owner.pk, action="delete", requested_by=None,
        status=Operation.Status.FAILED, error="gone", log="a\nb", params={"force": True},
        started_at=now, finished_at=now, progress=100, request_id="r-1",
    )  # fmt: skip
    audit_record(actor=owner, action="vm.start", obj=vms[0], before={"s": "stopped"}, after={"s": "running"})
    audit_record(actor=None, action="vm.delete", obj=vms[1], result=AuditResult.DENIED, message="missing x")
    AuditEvent.objects.create(
        actor_id=grantee.pk, actor_username=grantee.username, action="exec.run", object_type="vms.vm",
        object_id=str(vms[2].pk), object_owner_id=grantee.pk, source_ip="192.0.2.7", token_id=uuid.uuid4(),
        client_request_id="mine", after=None,
    )  # fmt: skip
    return vms


def test_it_renders_the_vm_list_exactly_as_the_serializer(api, owner, grantee, operator):
    _varied_rows(owner, grantee)
    for persona in (owner, grantee, operator):
        body = api.as_user(persona).get("/api/v1/vms/").json()
        expected = VmSerializer(list(selectors.vm_list_visible(persona)), many=True).data
        assert body["results"] == _json(expected)
        assert body["count"] == len(expected) > 0


def test_it_renders_a_vms_detail_exactly_as_the_serializer(api, owner, grantee, operator):
    vms = _varied_rows(owner, grantee)
    for persona, visible in ((owner, vms[:2]), (grantee, [vms[0], vms[2]]), (operator, vms)):
        for vm in visible:
            body = api.as_user(persona).get(f"/api/v1/vms/{vm.pk}/").json()
            assert body == _json(VmSerializer(VM.objects.get(pk=vm.pk)).data)


def test_it_renders_operations_exactly_as_the_serializer(api, owner, grantee, operator):
    vms = _varied_rows(owner, grantee)
    for persona in (owner, grantee, operator):
        body = api.as_user(persona).get("/api/v1/operations/").json()
        expected = OperationSerializer(list(selectors.operation_list_visible(persona)), many=True).data
        assert body["results"] == _json(expected)
        assert body["count"] == len(expected) > 0
    body = api.as_user(owner).get(f"/api/v1/vms/{vms[0].pk}/operations/").json()
    assert body["results"] == _json(OperationSerializer(list(vms[0].operations.all()), many=True).data)
    assert body["count"] == 1


def test_it_renders_audit_events_exactly_as_the_serializer(api, owner, grantee, operator):
    _varied_rows(owner, grantee)
    from accounts.selectors import audit_events_visible

    for persona in (owner, grantee, operator):
        body = api.as_user(persona).get("/api/v1/audit-events/?limit=500").json()
        expected = AuditEventSerializer(list(audit_events_visible(persona)[:500]), many=True).data
        assert body["results"] == _json(expected)


def test_it_refuses_a_serializer_field_it_cannot_read_from_a_row():
    with pytest.raises(TypeError, match="actions"):
        RowRenderer(VmSerializer)  # ``actions`` is a method field: it needs a row function


def _guardian_visible(user):
    qs = VM.objects.filter(VM.users_may_see())
    return get_objects_for_user(user, "vms.view_vm", klass=qs, accept_global_perms=True, with_superuser=True)


def test_it_shows_the_same_vms_as_guardian_for_every_persona(owner, grantee, stranger, viewer, operator, admin_user):
    mine = VmFactory(owner=owner)
    shared = VmFactory(owner=owner)
    by_group = VmFactory(owner=owner)
    VmFactory(owner=stranger)
    pool = VmFactory(owner=operator, purpose=VmPurpose.POOL)
    assign_perm("vms.view_vm", grantee, shared)
    assign_perm("vms.power_vm", viewer, mine)  # a right, but not the view right
    team = Group.objects.create(name="team")
    team.user_set.add(viewer)
    assign_perm("vms.view_vm", team, by_group)
    inactive = UserFactory(username="gone", role=Role.USER)
    assign_perm("vms.view_vm", inactive, mine)
    inactive.is_active = False
    inactive.save()
    for user in (owner, grantee, stranger, viewer, operator, admin_user, inactive):
        got = set(visible_queryset(user, VM.objects.all()).values_list("pk", flat=True))
        assert got == set(_guardian_visible(user).values_list("pk", flat=True)), user.username
        assert pool.pk not in got
    assert set(visible_queryset(viewer, VM.objects.all())) == {by_group}
    assert set(visible_queryset(grantee, VM.objects.all())) == {shared}


def test_it_lists_the_same_operations_as_the_or_definition(owner, grantee, stranger, operator):
    mine, shared, theirs = VmFactory(owner=owner), VmFactory(owner=owner), VmFactory(owner=stranger)
    assign_perm("vms.view_vm", grantee, shared)
    for vm in (mine, shared, theirs):
        Operation.objects.create(vm=vm, vm_ref=vm.pk, vm_owner_id=vm.owner_id, action="start", requested_by=vm.owner)
    Operation.objects.create(vm=theirs, vm_ref=theirs.pk, vm_owner_id=stranger.pk, action="stop", requested_by=grantee)
    Operation.objects.create(vm=None, vm_ref=uuid.uuid4(), vm_owner_id=owner.pk, action="delete", requested_by=None)
    for user in (owner, grantee, stranger):
        vm_ids = visible_queryset(user, VM.objects.all()).values("pk")
        expected = Operation.objects.filter(Q(vm_id__in=vm_ids) | Q(requested_by=user) | Q(vm_owner_id=user.pk))
        got = selectors.operation_list_visible(user)
        assert sorted(o.pk for o in got) == sorted(o.pk for o in expected), user.username
        assert got.count() == expected.count()
    assert selectors.operation_list_visible(operator).count() == Operation.objects.count()


def test_the_vm_list_filters_still_narrow_the_rows(api, owner):
    VmFactory(owner=owner, name="alpha-one", state="running", host=HostFactory(name="h2"))
    VmFactory(owner=owner, name="beta", state="stopped")
    client = api.as_user(owner)
    assert [v["name"] for v in client.get("/api/v1/vms/?state=running").json()["results"]] == ["alpha-one"]
    assert [v["name"] for v in client.get("/api/v1/vms/?name=ALPHA").json()["results"]] == ["alpha-one"]
    page = client.get("/api/v1/vms/?limit=1&offset=1").json()
    assert page["count"] == 2 and len(page["results"]) == 1


def test_it_writes_date_times_as_the_serializer_in_any_time_zone(owner, grantee):
    """Date-times are written without DRF's per-value zone lookup (RowRenderer.render_many):
    the same text in UTC (``Z``), in zones with an offset, and for a naive value."""
    from datetime import datetime

    _varied_rows(owner, grantee)
    rows = RowRenderer(OperationSerializer)
    created_at = OperationSerializer().fields["created_at"]
    naive = {**Operation.objects.values(*rows.values).first(), "created_at": datetime(2026, 1, 2, 3, 4, 5)}
    for zone in ("UTC", "Europe/Paris", "America/St_Johns"):
        with timezone.override(zone):
            ops = list(Operation.objects.order_by("pk"))
            page = list(Operation.objects.order_by("pk").values(*rows.values))
            assert rows.render_many(page) == OperationSerializer(ops, many=True).data
            assert rows.render(naive)["created_at"] == created_at.to_representation(naive["created_at"])
    assert rows.render_many(page)[0]["created_at"].endswith("Z")
