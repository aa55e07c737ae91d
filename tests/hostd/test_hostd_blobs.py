"""hostd's file ops (vms.hostd.blobs): strict paths, sha256-checked atomic commits, no leftovers."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hostd.runner import Hostd
from vms.hostd.client import TRANSFER_WINDOW, HostdClient, HostdRequestError
from vms.vmm.agent_protocol import MAX_DATA


@pytest.fixture
def roots() -> Iterator[tuple[Path, Path]]:
    base = Path(tempfile.mkdtemp(prefix="hdb-", dir="/tmp"))
    (base / "run").mkdir()
    (base / "snap").mkdir()
    yield base / "run", base / "snap"
    subprocess.run(["rm", "-rf", str(base)], check=False)


@pytest.fixture
def hostd(roots: tuple[Path, Path]) -> Iterator[Hostd]:
    run, snap = roots
    daemon = Hostd(run, blob_roots={"snapshots": snap}).start()
    yield daemon
    daemon.stop()


@pytest.fixture
def client(hostd: Hostd) -> Iterator[HostdClient]:
    with hostd.client() as c:
        yield c


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob(".*.part"))


def test_it_reads_stats_and_writes_a_file_in_chunks(client: HostdClient, roots: tuple[Path, Path]) -> None:
    """More chunks than the client keeps in flight: hostd answers them in any order."""
    run, snap = roots
    data = os.urandom(4 * TRANSFER_WINDOW * MAX_DATA + 1234)
    digest = hashlib.sha256(data).hexdigest()
    pieces = [data[i : i + 100_000] for i in range(0, len(data), 100_000)]
    client.blob_put("snapshots", "s1/disk.qcow2", pieces, size=len(data), sha256=digest)
    assert (snap / "s1" / "disk.qcow2").read_bytes() == data
    assert client.blob_stat("snapshots", "s1/disk.qcow2") == {"exists": True, "size": len(data), "sha256": digest}
    assert client.blob_stat("runtime", "s1/disk.qcow2") == {"exists": False}
    assert b"".join(client.blob_chunks("snapshots", "s1/disk.qcow2", len(data))) == data
    assert _leftovers(snap) == []


def test_it_writes_an_empty_file(client: HostdClient, roots: tuple[Path, Path]) -> None:
    run, _ = roots
    client.blob_put("runtime", "vm/empty", [], size=0, sha256=hashlib.sha256(b"").hexdigest())
    assert (run / "vm" / "empty").read_bytes() == b""


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        "../escape",
        "a/../../escape",
        "a/./b",
        "",
        "a//b",
        ".hidden",
        "a/.x.0123456789abcdef.part",
        "a\x00b",
        "/".join(["d"] * 17),
    ],
)
def test_it_refuses_paths_outside_a_plain_relative_name(client: HostdClient, path: str) -> None:
    with pytest.raises(HostdRequestError) as exc:
        client.blob_stat("runtime", path)
    assert exc.value.code == "bad_path"
    with pytest.raises(HostdRequestError) as exc:
        client.blob_put("runtime", path, [b"x"], size=1, sha256=hashlib.sha256(b"x").hexdigest())
    assert exc.value.code == "bad_path"


def test_it_refuses_an_unknown_root(client: HostdClient) -> None:
    with pytest.raises(HostdRequestError) as exc:
        client.blob_stat("etc", "passwd")
    assert exc.value.code == "bad_path"


def test_it_refuses_symlinks_out_of_its_root(client: HostdClient, roots: tuple[Path, Path]) -> None:
    run, _ = roots
    outside = run.parent / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (run / "link").symlink_to(outside)
    (run / "filelink").symlink_to(outside / "secret")
    for path in ("link/secret", "filelink"):
        with pytest.raises(HostdRequestError) as exc:
            client.call("blob_read", {"root": "runtime", "path": path, "offset": 0, "length": 10})
        assert exc.value.code == "bad_path"
    with pytest.raises(HostdRequestError) as exc:
        client.blob_put("runtime", "link/new", [b"x"], size=1, sha256=hashlib.sha256(b"x").hexdigest())
    assert exc.value.code == "bad_path"
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


def test_a_sha256_mismatch_leaves_nothing(client: HostdClient, roots: tuple[Path, Path]) -> None:
    run, _ = roots
    data = os.urandom(MAX_DATA + 10)
    with pytest.raises(HostdRequestError) as exc:
        client.blob_put("runtime", "vm/disk", [data], size=len(data), sha256=hashlib.sha256(b"other").hexdigest())
    assert exc.value.code == "checksum_mismatch"
    assert not (run / "vm" / "disk").exists()
    assert _leftovers(run) == []


def test_a_short_transfer_is_refused_and_more_than_announced_too(client: HostdClient, roots: tuple[Path, Path]) -> None:
    run, _ = roots
    data = b"y" * 1000
    digest = hashlib.sha256(data).hexdigest()
    with pytest.raises(HostdRequestError) as exc:
        client.blob_put("runtime", "vm/f", [data[:500]], size=1000, sha256=digest)
    assert exc.value.code == "size_mismatch"
    # the daemon's own bound, past the client's: a write beyond the announced size
    with pytest.raises(HostdRequestError) as exc:
        client.call(
            "blob_write", {"root": "runtime", "path": "vm/f", "transfer": "ab" * 8, "offset": 990, "size": 1000}, data
        )
    assert exc.value.code == "bad_request"
    assert not (run / "vm" / "f").exists()
    assert _leftovers(run) == []


def test_it_never_replaces_an_existing_file_unless_asked(client: HostdClient, roots: tuple[Path, Path]) -> None:
    run, _ = roots
    (run / "vm").mkdir()
    (run / "vm" / "disk").write_bytes(b"old")
    new = b"new contents"
    digest = hashlib.sha256(new).hexdigest()
    with pytest.raises(HostdRequestError) as exc:
        client.blob_put("runtime", "vm/disk", [new], size=len(new), sha256=digest)
    assert exc.value.code == "exists"
    assert (run / "vm" / "disk").read_bytes() == b"old"
    client.blob_put("runtime", "vm/disk", [new], size=len(new), sha256=digest, overwrite=True)
    assert (run / "vm" / "disk").read_bytes() == new
    assert _leftovers(run) == []


def test_the_file_appears_only_at_commit(client: HostdClient, roots: tuple[Path, Path]) -> None:
    run, _ = roots
    ident = {"root": "runtime", "path": "vm/disk", "transfer": "cd" * 8}
    client.call("blob_write", {**ident, "offset": 0, "size": 6}, b"abc")
    assert not (run / "vm" / "disk").exists()  # only the temporary file
    assert _leftovers(run) == [".disk." + "cd" * 8 + ".part"]
    client.call("blob_write", {**ident, "offset": 3, "size": 6}, b"def")
    client.call("blob_commit", {**ident, "size": 6, "sha256": hashlib.sha256(b"abcdef").hexdigest()})
    assert (run / "vm" / "disk").read_bytes() == b"abcdef"
    client.call("blob_write", {**ident, "path": "vm/other", "offset": 0, "size": 6}, b"abc")
    assert client.call("blob_abort", {**ident, "path": "vm/other"})[0] == {"aborted": True}
    assert _leftovers(run) == []


def test_it_deletes_a_file_and_its_emptied_directories(client: HostdClient, roots: tuple[Path, Path]) -> None:
    _, snap = roots
    (snap / "a" / "b").mkdir(parents=True)
    (snap / "a" / "b" / "f").write_bytes(b"1")
    assert client.blob_delete("snapshots", "a/b/f") is True
    assert client.blob_delete("snapshots", "a/b/f") is False
    assert list(snap.iterdir()) == []
    with pytest.raises(HostdRequestError) as exc:
        client.blob_delete("snapshots", "..")
    assert exc.value.code == "bad_path"


def test_a_restarted_hostd_drops_unfinished_transfers(roots: tuple[Path, Path]) -> None:
    run, snap = roots
    daemon = Hostd(run, blob_roots={"snapshots": snap}).start()
    try:
        with daemon.client() as client:
            client.call(
                "blob_write",
                {"root": "snapshots", "path": "s/disk", "transfer": "ef" * 8, "offset": 0, "size": 9},
                b"half",
            )
    finally:
        daemon.stop()
    (snap / "s" / ".keep.part").write_bytes(b"not ours: no transfer id")
    assert _leftovers(snap) == [".disk." + "ef" * 8 + ".part", ".keep.part"]
    daemon = Hostd(run, blob_roots={"snapshots": snap}).start()
    try:  # the sweep runs in the background once the daemon listens
        deadline = time.monotonic() + 10
        while _leftovers(snap) != [".keep.part"] and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        daemon.stop()
    assert _leftovers(snap) == [".keep.part"]


def test_image_copies_are_readable_by_the_vmms_and_everything_else_root_only(roots: tuple[Path, Path]) -> None:
    """Every VMM (an unprivileged user) reads the images, as it reads the built ones: a copy into
    an image root is 0644; a runtime or snapshot file arrives 0600 (the host's worker gives a
    snapshot layer to the VMM group before a VMM uses it)."""
    run, snap = roots
    images = run.parent / "images"
    images.mkdir()
    daemon = Hostd(run, blob_roots={"snapshots": snap, "images": images}).start()
    try:
        data = b"kernel bytes"
        with daemon.client() as c:
            for root in ("images", "snapshots", "runtime"):
                c.blob_put(root, "d/file", [data], size=len(data), sha256=hashlib.sha256(data).hexdigest())
    finally:
        daemon.stop()
    assert (images / "d/file").stat().st_mode & 0o777 == 0o644
    assert (snap / "d/file").stat().st_mode & 0o777 == 0o600
    assert (run / "d/file").stat().st_mode & 0o777 == 0o600


def test_nothing_is_written_below_a_directory_others_than_root_may_change(
    client: HostdClient, roots: tuple[Path, Path]
) -> None:
    """A VMM may write in its VM's runtime directory (mode 1770): a file there is fine (hostd
    never follows its last part), but a path through a directory it could swap for a symlink
    between hostd's check and its use is refused."""
    run, _ = roots
    vm_dir = run / "vm"
    vm_dir.mkdir()
    vm_dir.chmod(0o1770)
    data = b"x"
    digest = hashlib.sha256(data).hexdigest()
    client.blob_put("runtime", "vm/file", [data], size=1, sha256=digest)
    assert (vm_dir / "file").read_bytes() == data
    (vm_dir / "sub").mkdir()
    with pytest.raises(HostdRequestError) as refused:
        client.blob_put("runtime", "vm/sub/file", [data], size=1, sha256=digest)
    assert refused.value.code == "bad_path"
    with pytest.raises(HostdRequestError):
        client.blob_stat("runtime", "vm/sub/file")
    assert not (vm_dir / "sub" / "file").exists()


def test_a_fifo_is_not_read_and_does_not_block(client: HostdClient, roots: tuple[Path, Path]) -> None:
    run, _ = roots
    (run / "vm").mkdir()
    os.mkfifo(run / "vm" / "disk")
    calls = (
        lambda: client.blob_stat("runtime", "vm/disk"),
        lambda: b"".join(client.blob_chunks("runtime", "vm/disk", 10)),
    )
    for call in calls:
        with pytest.raises(HostdRequestError) as refused:
            call()
        assert refused.value.code == "bad_path"


@pytest.mark.parametrize("moment", ["begin", "commit"])
def test_the_start_up_sweep_never_takes_a_transfer_of_this_run(
    roots: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, moment: str
) -> None:
    """The sweep walks the trees while this run's first transfers arrive: a temporary file
    that is being made, or being checked and renamed by its commit, is this run's, not a
    leftover (a commit used to give up its file before the rename, and a sweep at that moment
    deleted it: the rename failed with FileNotFoundError)."""
    import asyncio

    from vms.hostd import blobs

    run, snap = roots
    store = blobs.BlobStore({"snapshots": snap})
    swept: list[int] = []
    real = {"begin": blobs._begin, "commit": blobs._commit}[moment]

    def with_a_sweep(*args, **kwargs):  # the sweep's thread, right at that moment
        if moment == "commit":  # before the rename
            swept.append(store.sweep())
            return real(*args, **kwargs)
        result = real(*args, **kwargs)  # the temporary file was just made
        swept.append(store.sweep())
        return result

    monkeypatch.setattr(blobs, f"_{moment}", with_a_sweep)
    data = b"a disk"
    where = {"root": "snapshots", "path": "s/disk", "transfer": "ab" * 8}

    async def transfer() -> None:
        await store.write({**where, "offset": 0, "size": len(data)}, data)
        await store.commit({**where, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})

    asyncio.run(transfer())
    assert swept == [0]
    assert (snap / "s" / "disk").read_bytes() == data and _leftovers(snap) == []
