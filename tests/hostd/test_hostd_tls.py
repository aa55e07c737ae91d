"""hostd's listener for other hosts: mutual TLS with the installation's CA (vms.pki,
vms.hostd.tls). The control plane's client certificate gets in (blocking and asyncio clients,
agent calls included); no certificate, another CA's certificate, a host's own (server-only)
certificate, plain TCP, and a hostd presenting another host's name are all refused."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hostd.runner import Hostd
from tests.hostd.test_hostd import _vmm
from vms import pki
from vms.hostd.client import AsyncHostdClient, HostdClient, HostdUnavailable
from vms.hostd.tls import TlsAddress, client_context


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="hdtls-", dir="/tmp"))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture
def ca(settings, root: Path) -> Path:
    settings.SANDBOX_PKI_DIR = root / "pki"
    return pki.ca_ensure().cert


@pytest.fixture
def remote(root: Path, ca: Path) -> Iterator[Hostd]:
    files = pki.host_cert_issue("h2", "127.0.0.1")
    daemon = Hostd(
        root / "runtime",
        tls_listen="127.0.0.1:0",
        tls_cert=files.cert,
        tls_key=files.key,
        tls_ca=ca,
    )
    (root / "runtime").mkdir()
    daemon.start()
    yield daemon
    with contextlib.suppress(Exception):
        daemon.stop()


def _address(daemon: Hostd, context: ssl.SSLContext, name: str = "h2") -> TlsAddress:
    assert daemon.daemon is not None and daemon.daemon.tls_port
    return TlsAddress("127.0.0.1", daemon.daemon.tls_port, context, server_hostname=name)


def _control(ca: Path) -> ssl.SSLContext:
    files = pki.control_ensure()
    return client_context(cert=files.cert, key=files.key, ca=ca)


def test_the_control_plane_reaches_a_remote_hostd_and_its_agents(remote: Hostd, ca: Path, root: Path) -> None:
    proc = _vmm(root / "runtime", "vm1")
    try:
        with HostdClient(_address(remote, _control(ca)), timeout=20) as client:
            assert client.call("hello")[0]["hostd_version"]
            assert client.agent_wait("vm1", timeout=15)["protocol"] == 2
            result, _ = client.agent("vm1", "exec_start", {"argv": ["echo", "over tls"], "wait": True})
            assert result

        async def via_asyncio() -> dict:
            async with AsyncHostdClient(_address(remote, _control(ca)), timeout=20) as aclient:
                return (await aclient.call("vm_list"))[0]

        assert [v["vm_id"] for v in asyncio.run(via_asyncio())["vms"]] == ["vm1"]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_the_ca_and_control_plane_keys_are_private(ca: Path) -> None:
    files = pki.control_ensure()
    for path in (pki.ca_files().key, files.key):
        assert path.stat().st_mode & 0o777 == 0o600


def _refused(address: TlsAddress) -> None:
    with pytest.raises(HostdUnavailable), HostdClient(address, timeout=5) as client:
        client.call("hello", timeout=5)  # a TLS 1.3 client learns of a refused certificate here


def test_a_client_without_a_certificate_is_refused(remote: Hostd, ca: Path) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca))
    _refused(_address(remote, context))


def test_a_certificate_of_another_ca_is_refused(remote: Hostd, ca: Path, settings, root: Path) -> None:
    settings.SANDBOX_PKI_DIR = root / "other-pki"
    stranger = pki.control_ensure()  # a new CA signs it
    _refused(_address(remote, client_context(cert=stranger.cert, key=stranger.key, ca=ca)))


def test_a_hosts_own_certificate_cannot_act_as_a_client(remote: Hostd, ca: Path) -> None:
    other_host = pki.host_cert_issue("h3", "127.0.0.1")  # same CA, serverAuth only
    _refused(_address(remote, client_context(cert=other_host.cert, key=other_host.key, ca=ca)))


def test_a_hostd_presenting_another_hosts_name_is_not_trusted(remote: Hostd, ca: Path) -> None:
    with pytest.raises(HostdUnavailable, match="certificate"):
        HostdClient(_address(remote, _control(ca), name="h9"), timeout=5).connect()


def test_plain_tcp_gets_nothing(remote: Hostd) -> None:
    assert remote.daemon is not None
    from vms.vmm.agent_protocol import encode_frame

    with socket.create_connection(("127.0.0.1", remote.daemon.tls_port), timeout=5) as sock:
        sock.sendall(encode_frame({"id": 1, "op": "hello", "args": {}}))
        sock.settimeout(5)
        try:
            answer = sock.recv(65536)
        except ConnectionResetError:
            answer = b""
    assert b"hostd_version" not in answer


def test_host_join_registers_the_host_and_issues_its_certificate(ca: Path, db) -> None:
    from cryptography import x509

    from accounts.models import AuditEvent
    from sandbox_site.errors import ApplicationError
    from vms.hostd_address import hostd_address
    from vms.hosts import host_join

    host, files = host_join(name="h2", address="127.0.0.1:7443")
    assert host.hostd_address == "127.0.0.1:7443" and AuditEvent.objects.filter(action="host.join").exists()
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["h2"]
    address = hostd_address(host)
    assert isinstance(address, TlsAddress) and (address.host, address.port, address.server_hostname) == (
        "127.0.0.1",
        7443,
        "h2",
    )
    with pytest.raises(ApplicationError):
        host_join(name="bad name", address="127.0.0.1:7443")
    with pytest.raises(ApplicationError):
        host_join(name="h4", address="no-port")
