"""Tenant isolation follows projects: on an isolated network, the VMs of one project (its
members') share a tenant and reach each other; another project's VMs, including another user's
personal project, are a different tenant (the nftables sets of ``host_rules``; traffic itself is
tested per tenant in test_dual_stack.py and test_plumbing.py)."""

from __future__ import annotations

import pytest

from accounts.models import ProjectRole
from accounts.services import project_create, project_member_set
from networking import selectors, services
from networking.models import Nic
from tests.factories import HostFactory, UserFactory, VmFactory

pytestmark = pytest.mark.django_db


def test_members_of_one_project_share_a_tenant_and_strangers_do_not(operator):
    host = HostFactory()
    alice, bob, carol = (UserFactory(username=n) for n in ("alice", "bob", "carol"))
    team = project_create(name="Team", slug="team", actor=alice)
    project_member_set(project=team, user=bob, role=ProjectRole.MEMBER, actor=alice)
    net = services.network_create(name="iso", cidr="10.231.82.0/24", actor=operator)
    assert net.tenant_isolation
    vms = {
        "alice-team": VmFactory(owner=alice, project=team, host=host, name="a"),
        "bob-team": VmFactory(owner=bob, project=team, host=host, name="b"),
        "alice-personal": VmFactory(owner=alice, host=host, name="ap"),
        "carol": VmFactory(owner=carol, host=host, name="c"),
    }
    taps = {key: services.nic_allocate(vm=vm, network=net).tap for key, vm in vms.items()}
    Nic.objects.update(plumbed=True)
    rules = next(n for n in selectors.host_rules(host).networks if n.bridge == net.bridge)
    tenant = {nic.tap: nic.tenant for nic in rules.nics}
    assert tenant[taps["alice-team"]] == tenant[taps["bob-team"]] == str(team.pk)
    assert tenant[taps["alice-personal"]] != tenant[taps["alice-team"]]
    assert len({tenant[taps["alice-personal"]], tenant[taps["carol"]], str(team.pk)}) == 3
