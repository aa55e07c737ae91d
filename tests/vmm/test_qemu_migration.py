"""Live migration of a running QEMU guest between two "hosts": two network namespaces this
test creates, joined by a veth link (the underlay); each host's QEMU runs in its own namespace
with its own runtime directory. The disk is mirrored over NBD and the RAM sent over TCP on
the link; nothing leaves the namespaces. One guest is booted; it carries a background exec
session (a counter) through the migration."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.vmm.agent_ops import agent_run
from vms.vmm.agent_client import AgentConnection, AgentTransport, agent_socket_path, wait_for_agent
from vms.vmm.base import MigrationTarget, MigrationTls, RuntimeState, VmmError, VmmUnsupported, VmSpec
from vms.vmm.process import running_vmm_pid
from vms.vmm.qemu import QemuDriver

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]
SERIAL = AgentTransport.VIRTIO_SERIAL
SOURCE_IP, TARGET_IP = "10.231.120.1", "10.231.120.2"
COUNTER = "i=0; while :; do i=$((i+1)); echo $i; echo $i > /root/counter; sleep 0.2; done"


@pytest.fixture
def snap_root() -> Iterator[Path]:
    # Beside the runtime directories (a snapshot moves the overlay by rename), readable for
    # the VMM user.
    root = Path(tempfile.mkdtemp(prefix="vmt-lmsnap-", dir="/tmp"))
    root.chmod(0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def hosts() -> Iterator[tuple[str, str]]:
    """Two namespaces ("source" and "target" host) joined by a veth pair."""
    if os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs root and qemu")
    from pyroute2 import IPRoute
    from pyroute2 import netns as pr_netns

    tag = uuid.uuid4().hex[:6]
    names = [f"msbtest-lma-{tag}", f"msbtest-lmb-{tag}"]
    for name in names:
        pr_netns.create(name)
    try:
        with IPRoute(netns=names[0]) as ipr:
            ipr.link("add", ifname="underlay", kind="veth", peer="underlay-b")
            ipr.link("set", index=ipr.link_lookup(ifname="underlay-b")[0], net_ns_fd=names[1])
        for name, ip in zip(names, (SOURCE_IP, TARGET_IP), strict=True):
            with IPRoute(netns=name) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                ifname = "underlay" if name == names[0] else "underlay-b"
                index = ipr.link_lookup(ifname=ifname)[0]
                ipr.addr("add", index=index, address=ip, prefixlen=24)
                ipr.link("set", index=index, state="up")
        yield names[0], names[1]
    finally:
        for name in names:
            try:
                pr_netns.remove(name)
            except OSError:
                pass


def _request(spec: VmSpec, op: str, args: dict[str, object]) -> dict[str, object]:
    with AgentConnection.open(agent_socket_path(spec), SERIAL, timeout=10) as conn:
        return conn.request(op, args, timeout=10)


def _sh(spec: VmSpec, command: str) -> str:
    with AgentConnection.open(agent_socket_path(spec), SERIAL, timeout=10) as conn:
        result, out = agent_run(conn, shell=command, wait=60)
    assert result.get("exit_code") == 0, (command, result, out)
    return out.decode().strip()


def _counter(spec: VmSpec) -> int:
    return int(_sh(spec, "cat /root/counter") or 0)


def _wait_counter_above(spec: VmSpec, value: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        now = _counter(spec)
        if now > value or time.monotonic() > deadline:
            return now
        time.sleep(0.5)


def test_it_moves_a_running_guest_with_its_disk_and_a_background_exec_to_another_host(
    driver: QemuDriver, make_spec: Callable[..., VmSpec], hosts: tuple[str, str], snap_root: Path
) -> None:
    ns_source, ns_target = hosts
    source = make_spec("lmig", netns=ns_source)
    target_spec = make_spec("lmig", netns=ns_target)  # same VM, the other host's runtime directory
    home = make_spec("lmig", netns=ns_source)  # where it comes back to
    try:
        driver.launch(source)
        wait_for_agent(source, SERIAL, timeout=150)
        started = _request(source, "exec_start", {"shell": COUNTER})
        exec_id, guest_pid = started["exec_id"], started["pid"]
        # Written after boot: lives in the source's overlay only, so the mirror must carry it.
        digest = _sh(source, "head -c 8M /dev/urandom > /root/blob && sync && sha256sum /root/blob")
        _sh(source, "echo before-migration > /root/marker && sync")
        before = _wait_counter_above(source, 0)
        assert before > 0

        # A target that died after preparing: the send fails and the VM runs on at the source.
        dead = driver.migrate_receive_prepare(target_spec, listen_host=TARGET_IP)
        driver.migrate_receive_abort(target_spec)
        assert not target_spec.runtime_dir.exists()
        with pytest.raises(VmmError):
            driver.migrate_send(source, dead, timeout=60)
        assert driver.info(source).state == RuntimeState.RUNNING
        assert _wait_counter_above(source, _counter(source)) > before

        # The real move. The target's answer travels between hosts as JSON.
        prepared = driver.migrate_receive_prepare(target_spec, listen_host=TARGET_IP)
        assert prepared.host == TARGET_IP and prepared.port > 0 and prepared.disk_port
        assert prepared.backing_chain == (str(source.base_image.resolve()),)
        wire = MigrationTarget.from_dict(json.loads(json.dumps(prepared.to_dict())))
        assert wire == prepared
        result = driver.migrate_send(source, wire, timeout=600)
        assert result.disk_sync == "top"  # same base image at the same path: only the overlay moves
        assert result.disk_bytes > 8 << 20 and result.ram_bytes > 0
        assert driver.info(source).state == RuntimeState.PAUSED  # stopped, left for cleanup
        driver.migrate_receive_finish(target_spec)
        assert driver.info(target_spec).state == RuntimeState.RUNNING
        driver.cleanup(source)
        assert running_vmm_pid(source.runtime_dir) is None

        wait_for_agent(target_spec, SERIAL, timeout=60)
        assert _sh(target_spec, "cat /root/marker") == "before-migration"
        assert _sh(target_spec, "sha256sum /root/blob") == digest
        # The background exec is the same process and keeps counting; its output is still there.
        at_target = _counter(target_spec)
        assert _wait_counter_above(target_spec, at_target) > at_target
        info = _request(target_spec, "exec_get", {"exec_id": exec_id})
        assert info["running"] is True and info["pid"] == guest_pid
        with AgentConnection.open(agent_socket_path(target_spec), SERIAL, timeout=10) as conn:
            got, data = conn.request_data("exec_read", {"exec_id": exec_id, "offset": 0}, timeout=10)
        lines = data.decode().split()
        assert lines[:3] == ["1", "2", "3"]  # from the start, written on the source
        # The disk stays writable on the target.
        _sh(target_spec, "echo after-migration >> /root/marker && sync")
        assert _sh(target_spec, "cat /root/marker").split() == ["before-migration", "after-migration"]

        # Back to the first host over TLS, from a disk that now sits on a snapshot layer the first
        # host does not have: the whole disk is copied (sync full), the guest keeps running.
        layer = driver.snapshot(target_spec, snap_root / "s1", include_memory=False)
        assert layer.backing_chain == [str(source.base_image.resolve())]
        server_tls = _tls(snap_root / "pki", "server", SOURCE_IP)
        back = driver.migrate_receive_prepare(home, listen_host=SOURCE_IP, tls=server_tls)
        assert back.tls
        with pytest.raises(VmmError, match="TLS"):  # plain TCP to a TLS target: refused at once
            driver.migrate_send(target_spec, back, timeout=60)
        # The source trusts another CA: it refuses the target. The source's certificate is of
        # another CA: the target refuses it. Either way the VM runs on where it is.
        rogue = _tls(snap_root / "rogue", "client", None)
        with pytest.raises(VmmError, match="known issuer"):
            driver.migrate_send(target_spec, back, tls=rogue, timeout=60)
        both = snap_root / "both-cas.pem"  # trusts the target, and its own certificate's CA
        both.write_bytes(server_tls.ca_cert.read_bytes() + rogue.ca_cert.read_bytes())
        impostor = MigrationTls(ca_cert=both, cert=rogue.cert, key=rogue.key)
        with pytest.raises(VmmError, match="TLS"):  # the target hung up in the handshake
            driver.migrate_send(target_spec, back, tls=impostor, timeout=60)
        assert driver.info(target_spec).state == RuntimeState.RUNNING
        driver.migrate_receive_abort(home)
        back = driver.migrate_receive_prepare(home, listen_host=SOURCE_IP, tls=server_tls)
        client_tls = _tls(snap_root / "pki", "client", None)
        result = driver.migrate_send(target_spec, back, tls=client_tls, timeout=600)
        assert result.disk_sync == "full" and result.disk_bytes >= 2 << 30  # every byte of the 2 GiB disk
        driver.migrate_receive_finish(home)
        driver.cleanup(target_spec)
        wait_for_agent(home, SERIAL, timeout=60)
        assert _sh(home, "cat /root/marker").split() == ["before-migration", "after-migration"]
        assert _sh(home, "sha256sum /root/blob") == digest
        at_home = _counter(home)
        assert _wait_counter_above(home, at_home) > at_home
        assert _request(home, "exec_get", {"exec_id": exec_id})["pid"] == guest_pid
    finally:
        for spec in (home, target_spec, source):
            driver.cleanup(spec)


def _tls(directory: Path, role: str, ip: str | None) -> MigrationTls:
    """A certificate for ``role`` ("server" naming ``ip``, or "client") from the CA in
    ``directory`` (made on first use): what an installation's PKI would issue each host."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key_path, ca_path = directory / "ca.key", directory / "ca.pem"
    if not ca_path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test CA {directory.name}")])
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )  # fmt: skip
        ca_key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        ca_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if role == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{role} {ip}")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )  # fmt: skip
    if ip:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    (directory / f"{role}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{role}.key").write_bytes(_key_pem(key))
    return MigrationTls(ca_cert=ca_path, cert=directory / f"{role}.pem", key=directory / f"{role}.key")


def _key_pem(key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_firmware_booted_vms_are_refused_before_anything_starts(tmp_path: Path) -> None:
    spec = VmSpec(
        vm_id="uefi",
        runtime_dir=tmp_path / "rd",
        kernel=tmp_path / "k",
        base_image=tmp_path / "disk",
        boot_mode="uefi",
    )
    driver = QemuDriver()
    with pytest.raises(VmmUnsupported):
        driver.migrate_receive_prepare(spec, listen_host="127.0.0.1")
    with pytest.raises(VmmUnsupported):
        driver.migrate_send(spec, MigrationTarget(driver="qemu", host="127.0.0.1", port=1))
    assert not spec.runtime_dir.exists()
