"""Address management against the real PostgreSQL (threads need committed rows: transactional)."""

import ipaddress
import threading

import pytest
from django.db import connection, transaction

from accounts.models import AuditEvent
from networking import services
from networking.models import Network, Nic
from sandbox_site.errors import ConflictError, NotPermitted
from tests.factories import UserFactory, VmFactory


@pytest.mark.django_db(transaction=True)
def test_it_gives_20_concurrent_creates_20_distinct_addresses():
    owner = UserFactory()
    services.network_default_ensure()
    vms = [VmFactory(owner=owner, name=f"c{i}") for i in range(20)]
    barrier = threading.Barrier(20)
    results, errors = [], []

    def create(vm):
        try:
            barrier.wait(10)
            with transaction.atomic():
                results.append(services.nic_allocate(vm=vm))
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=create, args=(vm,)) for vm in vms]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    ips = [r.ip for r in results]
    assert len(ips) == 20 and len(set(ips)) == 20
    assert len({r.mac for r in results}) == 20 and len({r.tap for r in results}) == 20
    network = Network.objects.get(is_default=True)
    assert network.gateway not in ips
    assert all(ipaddress.IPv4Address(ip) in network.ip_network for ip in ips)
    assert Nic.objects.count() == 20


@pytest.mark.django_db(transaction=True)
def test_it_creates_the_default_network_once_under_concurrency():
    barrier = threading.Barrier(8)
    ids, errors = [], []

    def ensure():
        try:
            barrier.wait(10)
            ids.append(services.network_default_ensure().pk)
        except Exception as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=ensure) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(set(ids)) == 1
    assert Network.objects.count() == 1


def test_it_releases_addresses_on_delete_and_reuses_them(db, owner):
    a, b = VmFactory(owner=owner, name="a"), VmFactory(owner=owner, name="b")
    first = services.nic_allocate(vm=a)
    second = services.nic_allocate(vm=b)
    assert (first.ip, second.ip) == ("10.231.0.2", "10.231.0.3")
    assert first.gateway == "10.231.0.1" and first.prefix == 24 and first.netmask == "255.255.255.0"
    assert first.kernel_args == "sandbox.ip=10.231.0.2/24 sandbox.gw=10.231.0.1"
    assert services.nic_release(vm=a, actor=owner) == 1
    assert not Nic.objects.filter(vm=a).exists()
    assert AuditEvent.objects.filter(action="vm.nic_release", object_id=str(a.pk)).exists()
    c = VmFactory(owner=owner, name="c")
    assert services.nic_allocate(vm=c).ip == "10.231.0.2"


def test_it_releases_addresses_when_the_vm_row_goes(db, owner):
    vm = VmFactory(owner=owner)
    services.nic_allocate(vm=vm)
    vm.delete()
    assert not Nic.objects.exists()


def test_it_refuses_when_the_subnet_is_full(db, owner, operator):
    tiny = services.network_create(name="tiny", cidr="10.231.9.0/29", actor=operator)  # 6 hosts, 1 is the gateway
    for i in range(5):
        services.nic_allocate(vm=VmFactory(owner=owner, name=f"t{i}"), network=tiny)
    with pytest.raises(ConflictError) as err:
        services.nic_allocate(vm=VmFactory(owner=owner, name="one-too-many"), network=tiny)
    assert err.value.code == "network_full"


def test_it_checks_the_right_to_use_a_private_network(db, owner, stranger, operator):
    private = services.network_create(name="private", cidr="10.231.10.0/24", owner=owner, actor=operator)
    services.nic_allocate(vm=VmFactory(owner=owner), network=private, actor=owner)
    with pytest.raises(NotPermitted):
        services.nic_allocate(vm=VmFactory(owner=stranger), network=private, actor=stranger)


def test_it_refuses_overlapping_subnets(db, operator):
    services.network_create(name="one", cidr="10.231.20.0/24", actor=operator)
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError):
        services.network_create(name="two", cidr="10.231.0.0/16", actor=operator)
