"""``vms.transfer.host_file_copy``: a file copied from one host's hostd to another's, relayed by
the control plane (this machine's hostd over its Unix socket, "h2"'s over mutual TLS; each with
its own runtime and snapshot roots)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.factories import HostFactory
from tests.hostd.runner import Hostd
from vms import pki
from vms.transfer import TransferError, host_file_copy, host_file_delete
from vms.vmm.agent_protocol import MAX_DATA

pytestmark = pytest.mark.django_db


@pytest.fixture
def two_hosts(settings):
    base = Path(tempfile.mkdtemp(prefix="xfer-", dir="/tmp"))
    roots = {}
    for name in ("h1", "h2"):
        for sub in ("run", "snap"):
            (base / name / sub).mkdir(parents=True)
        roots[name] = base / name
    settings.SANDBOX_PKI_DIR = base / "pki"
    settings.SANDBOX_HOST_NAME = "h1"
    settings.SANDBOX_HOSTD_SOCKET = roots["h1"] / "run" / "hostd.sock"
    local = Hostd(roots["h1"] / "run", blob_roots={"snapshots": roots["h1"] / "snap"}).start()
    files = pki.host_cert_issue("h2", "127.0.0.1")
    remote = Hostd(
        roots["h2"] / "run",
        blob_roots={"snapshots": roots["h2"] / "snap"},
        tls_listen="127.0.0.1:0",
        tls_cert=files.cert,
        tls_key=files.key,
        tls_ca=pki.ca_files().cert,
    ).start()
    h1 = HostFactory(name="h1")
    h2 = HostFactory(name="h2", hostd_address=f"127.0.0.1:{remote.daemon.tls_port}")
    try:
        yield h1, h2, roots
    finally:
        local.stop()
        remote.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)


def _leftovers(directory: Path) -> list[Path]:
    return list(directory.rglob(".*.part"))


def test_it_copies_a_file_both_ways_verified_by_sha256(two_hosts):
    h1, h2, roots = two_hosts
    data = os.urandom(5 * MAX_DATA + 77)
    digest = hashlib.sha256(data).hexdigest()
    (roots["h1"] / "snap" / "s1").mkdir()
    (roots["h1"] / "snap" / "s1" / "disk.qcow2").write_bytes(data)

    assert host_file_copy(source=h1, target=h2, root="snapshots", path="s1/disk.qcow2") == digest
    assert (roots["h2"] / "snap" / "s1" / "disk.qcow2").read_bytes() == data
    # already there with the same bytes: not copied again (a changed source file would be refused)
    copied = roots["h2"] / "snap" / "s1" / "disk.qcow2"
    inode = copied.stat().st_ino
    assert host_file_copy(source=h1, target=h2, root="snapshots", path="s1/disk.qcow2", sha256=digest) == digest
    assert copied.stat().st_ino == inode
    # and back, into another root name of the same host
    (roots["h2"] / "run" / "vm1").mkdir()
    (roots["h2"] / "run" / "vm1" / "overlay.qcow2").write_bytes(data[:1000])
    assert (
        host_file_copy(source=h2, target=h1, root="runtime", path="vm1/overlay.qcow2")
        == hashlib.sha256(data[:1000]).hexdigest()
    )
    assert (roots["h1"] / "run" / "vm1" / "overlay.qcow2").read_bytes() == data[:1000]
    assert host_file_delete(host=h2, root="runtime", path="vm1/overlay.qcow2") is True
    assert not (roots["h2"] / "run" / "vm1").exists()


def test_an_unexpected_sha256_copies_nothing(two_hosts):
    h1, h2, roots = two_hosts
    (roots["h1"] / "run" / "vm1").mkdir()
    (roots["h1"] / "run" / "vm1" / "overlay.qcow2").write_bytes(b"disk bytes")
    with pytest.raises(TransferError) as exc:
        host_file_copy(source=h1, target=h2, root="runtime", path="vm1/overlay.qcow2", sha256="0" * 64)
    assert exc.value.code == "checksum_mismatch"
    assert not (roots["h2"] / "run" / "vm1").exists()


def test_a_different_file_on_the_target_is_never_overwritten(two_hosts):
    h1, h2, roots = two_hosts
    for name, content in (("h1", b"new"), ("h2", b"old")):
        (roots[name] / "run" / "vm1").mkdir()
        (roots[name] / "run" / "vm1" / "overlay.qcow2").write_bytes(content)
    with pytest.raises(TransferError) as exc:
        host_file_copy(source=h1, target=h2, root="runtime", path="vm1/overlay.qcow2")
    assert exc.value.code == "exists"
    assert (roots["h2"] / "run" / "vm1" / "overlay.qcow2").read_bytes() == b"old"


def test_missing_files_bad_paths_and_the_same_host_are_refused(two_hosts):
    h1, h2, roots = two_hosts
    with pytest.raises(TransferError) as exc:
        host_file_copy(source=h1, target=h2, root="runtime", path="vm1/nothing")
    assert exc.value.code == "not_found"
    with pytest.raises(TransferError) as exc:
        host_file_copy(source=h1, target=h2, root="runtime", path="../h2/run/x")
    assert exc.value.details["reason"] == "bad_path"
    with pytest.raises(TransferError) as exc:
        host_file_copy(source=h1, target=h1, root="runtime", path="x")
    assert exc.value.code == "same_host"
    assert _leftovers(roots["h2"]) == []


def test_a_source_that_shrinks_mid_copy_leaves_nothing(two_hosts, monkeypatch):
    """The file is truncated on the source after its stat: the copy fails and the target
    keeps no partial file."""
    h1, h2, roots = two_hosts
    path = roots["h1"] / "run" / "vm1" / "overlay.qcow2"
    path.parent.mkdir()
    path.write_bytes(os.urandom(3 * MAX_DATA))
    from vms.hostd.client import HostdClient

    real_chunks = HostdClient.blob_chunks

    def shrinking(self, root, p, size, *, timeout=60.0):
        path.write_bytes(b"short")
        yield from real_chunks(self, root, p, size, timeout=timeout)

    monkeypatch.setattr(HostdClient, "blob_chunks", shrinking)
    with pytest.raises(TransferError) as exc:
        host_file_copy(source=h1, target=h2, root="runtime", path="vm1/overlay.qcow2")
    assert exc.value.details["reason"] == "size_mismatch"
    assert not (roots["h2"] / "run" / "vm1" / "overlay.qcow2").exists()
    assert _leftovers(roots["h2"]) == []
