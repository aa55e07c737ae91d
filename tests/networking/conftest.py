"""Every test that touches interfaces or nftables does it in network namespaces it creates
(``make_netns``), removed at the end even on failure. ``SANDBOX_NETNS`` points at a
namespace that does not exist unless a test sets it, so stray plumbing fails loudly instead
of touching the host namespace."""

from __future__ import annotations

import os
import shutil
import uuid

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

ABSENT_NETNS = "msbtest-absent"


@pytest.fixture(autouse=True)
def _never_the_host_namespace(settings):
    settings.SANDBOX_NETNS = ABSENT_NETNS


@pytest.fixture
def make_netns():
    if os.geteuid() != 0:
        pytest.skip("network namespace tests need root")
    if shutil.which("nft") is None:
        pytest.skip("nft is not installed (apt-get install nftables)")
    created: list[str] = []

    def make(tag: str = "ns") -> str:
        name = f"msbtest-{tag}-{uuid.uuid4().hex[:6]}"
        pr_netns.create(name)
        created.append(name)
        with IPRoute(netns=name) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return name

    yield make
    for name in reversed(created):
        try:
            pr_netns.remove(name)
        except OSError:
            pass
    leftovers = [n for n in created if os.path.exists(f"/run/netns/{n}")]
    assert not leftovers, f"namespaces left behind: {leftovers}"


@pytest.fixture
def host_ns(make_netns, settings) -> str:
    """The namespace standing in for the hypervisor host: SANDBOX_NETNS points at it."""
    name = make_netns("host")
    settings.SANDBOX_NETNS = name
    return name
