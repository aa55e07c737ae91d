"""No N+1 queries: every list endpoint (API and dashboard) runs as many queries for 50 rows
as for 5, for the owner and for an operator. Rows are made the cheap way (ORM and
factories); what matters is that each list has rows of every kind it serialises (related
objects, permissions, children, rules)."""

from __future__ import annotations

import itertools

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from accounts.audit import audit_record
from accounts.models import ApiToken, Role
from accounts.services import token_create
from networking.models import EgressRule, Network, Nic, PortForward
from snapshots.models import Snapshot
from tests.factories import HostFactory, ImageFactory, SnapshotFactory, TemplateFactory, UserFactory, VmFactory
from vms.models import Image, Operation

pytestmark = pytest.mark.django_db

_seq = itertools.count(1)


class Rows:
    """Adds ``n`` more rows of every kind a list shows, for ``owner``."""

    def __init__(self, owner, operator):
        self.owner = owner
        self.operator = operator
        self.host = HostFactory()
        self.first_vm = None
        self.network = Network.objects.create(
            name="qc-net", cidr="10.77.0.0/16", gateway="10.77.0.1", bridge="qcbr0", owner=owner
        )
        self.parent_snapshot = None

    def add(self, n: int) -> None:
        for _ in range(n):
            i = next(_seq)
            image = ImageFactory(name=f"qc-image-{i}", created_by=self.operator, is_public=True)
            template = TemplateFactory(name=f"qc-template-{i}", image=image)
            vm = VmFactory(owner=self.owner, template=template, host=self.host, image=image if i % 2 else None)
            self.first_vm = self.first_vm or vm
            Nic.objects.create(vm=vm, network=self.network, ip=f"10.77.{i // 250}.{i % 250 + 2}", mac=_mac(i))
            op = Operation.objects.create(
                vm=self.first_vm,
                vm_ref=self.first_vm.pk,
                vm_owner_id=self.owner.pk,
                action="start",
                requested_by=self.owner,
                status=Operation.Status.FAILED if i % 2 else Operation.Status.RUNNING,
                finished_at=timezone.now(),
            )
            assert op.pk
            audit_record(actor=self.owner, action="vm.start", obj=vm, after={"n": i})
            snapshot = SnapshotFactory(vm=self.first_vm, parent=self.parent_snapshot, name=f"qc-snap-{i}")
            self.parent_snapshot = snapshot
            network = Network.objects.create(
                name=f"qc-net-{i}", cidr=f"10.{100 + i // 250}.{i % 250}.0/24", gateway="10.0.0.1",
                bridge=f"qcbr{i}", owner=self.owner,
            )  # fmt: skip
            EgressRule.objects.create(network=network, cidr="192.0.2.0/24")
            EgressRule.objects.create(vm=vm, cidr="198.51.100.0/24")
            from guardian.shortcuts import assign_perm

            assign_perm("networking.view_network", self.owner, network)
            if ApiToken.objects.filter(user=self.owner).count() < 40:
                token_create(user=self.owner, name=f"qc-token-{i}", actor=self.owner)
            else:
                ApiToken.objects.create(user=self.owner, name=f"qc-token-{i}", prefix=f"p{i}", token_hash=f"h{i}")
            PortForward.objects.create(vm=self.first_vm, host=self.host, host_port=20000 + i, guest_port=80)
            UserFactory(username=f"qc-user-{i}", role=Role.USER)
            HostFactory(name=f"qc-host-{i}")


def _mac(i: int) -> str:
    return f"02:00:00:00:{i // 256:02x}:{i % 256:02x}"


LIST_URLS = [
    "/api/v1/vms/",
    "/api/v1/vms/?state=stopped",
    "/api/v1/operations/",
    "/api/v1/audit-events/",
    "/api/v1/snapshots/",
    "/api/v1/networks/",
    "/api/v1/images/",
    "/api/v1/templates/",
    "/api/v1/tokens/",
    "/api/v1/users/",
    "/api/v1/vms/{vm}/",
    "/api/v1/vms/{vm}/operations/",
    "/api/v1/vms/{vm}/snapshots/",
    "/api/v1/vms/{vm}/port-forwards/",
    "/api/v1/vms/{vm}/nics/",
    "/",
    "/vms/{vm}/",
    "/operations/",
    "/audit/",
    "/tokens/",
]
OPERATOR_ONLY = ["/hosts/", "/system/"]


def _count(client, url: str) -> int:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url)
    assert response.status_code == 200, (url, response.status_code, getattr(response, "content", b"")[:300])
    return len(queries)


def _counts(api, persona, rows: Rows, urls) -> dict[str, int]:
    client = api.as_user(persona)
    for url in urls:  # warm what is cached per process (content types) or per session
        _count(client, url.format(vm=rows.first_vm.pk))
    return {url: _count(client, url.format(vm=rows.first_vm.pk)) for url in urls}


@pytest.mark.parametrize("persona_name", ["owner", "operator"])
def test_list_endpoints_run_the_same_number_of_queries_for_5_and_50_rows(api, owner, operator, persona_name):
    persona = owner if persona_name == "owner" else operator
    urls = LIST_URLS + (OPERATOR_ONLY if persona_name == "operator" else [])
    rows = Rows(owner, operator)
    rows.add(5)
    few = _counts(api, persona, rows, urls)
    rows.add(45)
    assert Snapshot.objects.count() == 50 and Image.objects.count() >= 50
    many = _counts(api, persona, rows, urls)
    grown = {url: (few[url], many[url]) for url in urls if many[url] != few[url]}
    assert not grown, f"query count grows with the rows (5 rows, 50 rows): {grown}"


@pytest.mark.parametrize("wait", [True, False])
def test_an_exec_runs_four_queries(owner, grantee, monkeypatch, wait):
    """``POST .../exec/`` with a token, for a user holding ``exec`` on the VM through a share:
    the token, the VM, the user's rights (its role's, its and its groups' rights on the VM and
    its project roles, in one query, read once for the view's check and the service's), the
    audit row. Sealing the row into the chain runs after the response (accounts.audit), not in
    the request."""
    import contextlib

    from guardian.shortcuts import assign_perm
    from rest_framework.test import APIClient

    from vms import agent_gateway, exec_services

    vm = VmFactory(owner=owner, state="running")
    for perm in ("view_vm", "exec_vm"):
        assign_perm(f"vms.{perm}", grantee, vm)

    def agent(op, args=None, data=b"", *, timeout=30.0, meanwhile=None):
        if meanwhile is not None:
            meanwhile()
        if op == "exec_start":
            return {"exec_id": "e1", "pid": 1, "tag": ""}, b""
        assert op == "exec_wait"
        return {"exec_id": "e1", "running": False, "end_offset": 0, "result": {"exit_code": 0}}, b""

    @contextlib.contextmanager
    def session(vm, *, timeout=30.0):
        yield agent

    monkeypatch.setattr(exec_services, "agent_session", session)
    monkeypatch.setattr(agent_gateway, "exec_start_capped", lambda vm, args, stdin=b"", **kw: agent("exec_start")[0])
    _, secret = token_create(user=grantee, name="qc-exec", actor=grantee)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    url = f"/api/v1/vms/{vm.pk}/exec/"
    assert client.post(url, {"command": ["true"], "wait": wait}, format="json").status_code in (200, 202)  # warm
    with CaptureQueriesContext(connection) as queries:
        response = client.post(url, {"command": ["true"], "wait": wait}, format="json")
    assert response.status_code == (200 if wait else 202), response.content
    assert len(queries) == 4, "\n".join(q["sql"][:160] for q in queries.captured_queries)


@pytest.mark.parametrize("persona_name", ["owner", "operator"])
def test_the_hot_list_endpoints_run_four_queries(owner, operator, persona_name):
    """With a token, as benchmarks/api.py reads them: the token with its user; the user's
    global rights, groups and project roles (one query, accounts.rights.request_user_standing);
    the page's COUNT(*) and the page. A VM's detail: the token, the VM with its related rows,
    the user's rights on it."""
    from rest_framework.test import APIClient

    persona = owner if persona_name == "owner" else operator
    vm = VmFactory(owner=owner)
    Operation.objects.create(vm=vm, vm_ref=vm.pk, vm_owner_id=owner.pk, action="start", requested_by=owner)
    audit_record(actor=owner, action="vm.start", obj=vm)
    _, secret = token_create(user=persona, name="qc-hot", actor=persona)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    expected = {"/api/v1/vms/": 4, "/api/v1/operations/": 4, "/api/v1/audit-events/": 4, f"/api/v1/vms/{vm.pk}/": 3}
    for url in expected:
        _count(client, url)  # warm what is cached per process
    counts = {url: _count(client, url) for url in expected}
    assert counts == expected
