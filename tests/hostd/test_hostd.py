"""hostd against stand-in VMMs (tests/hostd/fake_vmm.py) that run the real guest agent code
on this host: multiplexing, streams, reconnects, console, hostile guests. No VM boots."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hostd.runner import FAKE_VMM, Hostd
from vms.hostd.agent_link import LinkBudget
from vms.hostd.client import AsyncHostdClient, HostdClient, HostdRequestError
from vms.hostd.console import STREAM_CHUNK, STREAM_READ


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="hd-", dir="/tmp"))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def _vmm(root: Path, name: str, *extra: str) -> subprocess.Popen[bytes]:
    rd = root / name
    rd.mkdir()
    (rd / "spec.json").write_text("{}")
    proc = subprocess.Popen([sys.executable, str(FAKE_VMM), str(rd), *extra], start_new_session=True)
    deadline = time.monotonic() + 10
    while not (rd / "agent.sock").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc


def _replace_vmm(root: Path, name: str, old: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    """What a snapshot restore does: the VMM is killed and a new one (new pid) serves the same
    runtime directory and socket paths."""
    os.killpg(old.pid, signal.SIGKILL)
    old.wait()
    rd = root / name
    for sock in ("agent.sock", "serial.sock"):
        (rd / sock).unlink()
    proc = subprocess.Popen([sys.executable, str(FAKE_VMM), str(rd)], start_new_session=True)
    deadline = time.monotonic() + 10
    while not (rd / "agent.sock").exists() or (rd / "vmm.pid").read_text() != str(proc.pid):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc


@pytest.fixture
def vmm(root: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = _vmm(root, "vm1")
    yield proc
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture
def hostd(root: Path) -> Iterator[Hostd]:
    daemon = Hostd(root)
    daemon.start()
    yield daemon
    with contextlib.suppress(Exception):
        daemon.stop()


def test_it_finds_running_vms_and_answers_through_one_connection(hostd: Hostd, vmm) -> None:
    with hostd.client() as client:
        assert client.agent_wait("vm1", timeout=10)["protocol"] == 2
        vms = client.call("vm_list")[0]["vms"]
        assert [v["vm_id"] for v in vms] == ["vm1"] and vms[0]["agent"]["connected"]
        with pytest.raises(HostdRequestError) as err:
            client.agent("nope", "ping")
        assert err.value.code == "vm_not_running"
        with pytest.raises(HostdRequestError) as err:
            client.agent("vm1", "bogus")
        assert err.value.code == "unknown_op"


def test_the_socket_is_private(hostd: Hostd) -> None:
    assert hostd.config.socket_path.stat().st_mode & 0o777 == 0o600


def test_many_clients_share_the_agent_concurrently(hostd: Hostd, vmm) -> None:
    with hostd.client() as client:
        client.agent_wait("vm1", timeout=10)

    def one(n: int) -> bytes:
        with hostd.client() as client:
            r = client.agent("vm1", "exec_start", {"shell": f"sleep 0.5; echo {n}"})[0]
            client.agent("vm1", "exec_wait", {"exec_id": r["exec_id"], "timeout": 20}, timeout=25)
            return client.agent("vm1", "exec_read", {"exec_id": r["exec_id"]})[1]

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        assert list(pool.map(one, range(20))) == [f"{n}\n".encode() for n in range(20)]


def test_an_exec_stream_survives_an_agent_reconnect(hostd: Hostd, vmm) -> None:
    with hostd.client() as client:
        client.agent_wait("vm1", timeout=10)
        script = "i=1; while [ $i -le 3000 ]; do echo line $i; [ $((i % 300)) -eq 0 ] && sleep 0.2; i=$((i+1)); done"
        exec_id = client.agent("vm1", "exec_start", {"shell": script})[0]["exec_id"]
        got = bytearray()
        kicked = False
        for ev in client.exec_stream("vm1", exec_id):
            if ev["ev"] == "out":
                assert ev["offset"] == len(got)  # nothing missing, nothing twice
                got += ev["data"]
                if not kicked and len(got) > 5000:
                    kicked = True
                    hostd.loop.call_soon_threadsafe(hostd.daemon.vms["vm1"].agent.kick)
        assert ev["ev"] == "exit" and ev["result"]["exit_code"] == 0
        assert got.decode().splitlines() == [f"line {i}" for i in range(1, 3001)]
        assert client.call("vm_status", {"vm_id": "vm1"})[0]["agent"]["sessions"] >= 2


def test_a_scan_keeps_an_agent_link_that_already_reconnected_to_a_new_vmm(root: Path, vmm) -> None:
    # The snapshot-restore race: the link reconnects to the new VMM before the next scan sees
    # the new pid; that scan must not drop the (good) link under a request in flight.
    hostd = Hostd(root, scan_seconds=3600)  # scans only when the test says so
    hostd.start()
    new = None
    try:
        with hostd.client() as client:
            client.agent_wait("vm1", timeout=10)
            old_pid = client.call("vm_status", {"vm_id": "vm1"})[0]["pid"]
            assert old_pid == vmm.pid
            new = _replace_vmm(root, "vm1", vmm)
            deadline = time.monotonic() + 15
            while True:  # the link notices the dead VMM by itself and reconnects to the new one
                status = client.call("vm_status", {"vm_id": "vm1"})[0]
                if status["agent"]["connected"] and status["agent"]["sessions"] >= 2:
                    break
                assert time.monotonic() < deadline, status
                time.sleep(0.05)
            assert status["pid"] == old_pid  # hostd has not scanned yet
            assert status["agent"]["vmm_pid"] == new.pid  # but the link knows whom it reached
            exec_id = client.agent("vm1", "exec_start", {"shell": "sleep 1.5; echo restored"})[0]["exec_id"]
            with hostd.client() as waiter, concurrent.futures.ThreadPoolExecutor(1) as pool:
                in_flight = pool.submit(
                    waiter.agent, "vm1", "exec_wait", {"exec_id": exec_id, "timeout": 10}, timeout=15
                )
                deadline = time.monotonic() + 10
                while client.call("vm_status", {"vm_id": "vm1"})[0]["agent"]["pending"] < 1:  # now in flight
                    assert time.monotonic() < deadline and not in_flight.done()
                    time.sleep(0.02)
                hostd.scan()  # sees the new pid
                assert in_flight.result()[0]["result"]["exit_code"] == 0
            status = client.call("vm_status", {"vm_id": "vm1"})[0]
            assert status["pid"] == new.pid
            assert status["agent"]["connected"] and status["agent"]["sessions"] == 2
            assert client.agent("vm1", "exec_read", {"exec_id": exec_id})[1] == b"restored\n"
    finally:
        hostd.stop()
        if new is not None:
            os.killpg(new.pid, signal.SIGKILL)
            new.wait()


def test_a_restarted_hostd_reattaches_and_finds_the_processes(root: Path, vmm) -> None:
    first = Hostd(root)
    first.start()
    with first.client() as client:
        client.agent_wait("vm1", timeout=10)
        exec_id = client.agent("vm1", "exec_start", {"shell": "sleep 1; echo done", "tag": "bg"})[0]["exec_id"]
    first.stop()
    second = Hostd(root)
    second.start()
    try:
        with second.client() as client:
            client.agent_wait("vm1", timeout=10)
            listed = client.agent("vm1", "exec_list", {"tag": "bg"})[0]["execs"]
            assert [e["exec_id"] for e in listed] == [exec_id]
            client.agent("vm1", "exec_wait", {"exec_id": exec_id, "timeout": 10}, timeout=15)
            assert client.agent("vm1", "exec_read", {"exec_id": exec_id})[1] == b"done\n"
    finally:
        second.stop()


def test_files_stream_both_ways_with_checksums(hostd: Hostd, vmm, root: Path) -> None:
    blob = os.urandom(5 * 1024 * 1024 + 123)
    target = str(root / "uploaded.bin")
    with hostd.client() as client:
        client.agent_wait("vm1", timeout=10)
        result = client.upload("vm1", target, [blob[i : i + 100000] for i in range(0, len(blob), 100000)], mode=0o640)
        assert result["sha256"] == hashlib.sha256(blob).hexdigest()
        assert Path(target).read_bytes() == blob and Path(target).stat().st_mode & 0o777 == 0o640
        info = client.download_open("vm1", target)
        assert b"".join(client.download_chunks("vm1", info["handle"], expected_sha256=info["sha256"])) == blob
        with pytest.raises(HostdRequestError) as err:
            client.upload("vm1", str(root / "limited.bin"), [blob], max_bytes=1000)
        assert err.value.code == "too_large"
    assert not [p for p in root.iterdir() if "limited" in p.name]


async def _console_ready(client: AsyncHostdClient, vm_id: str = "vm1") -> None:
    deadline = time.monotonic() + 15
    while not (await client.call("console_info", {"vm_id": vm_id}))[0]["connected"]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)


def test_console_replays_from_an_offset_then_goes_live_and_takes_input(hostd: Hostd, vmm, root: Path) -> None:
    async def scenario() -> None:
        async with AsyncHostdClient(hostd.config.socket_path) as client:
            await _console_ready(client)
            # A few ticks in history before attaching, so the stream starts with a replay.
            deadline = time.monotonic() + 15
            while (await client.call("console_info", {"vm_id": "vm1"}))[0]["end_offset"] < len(b"tick 1\ntick 2\n"):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            sub = await client.console_attach("vm1", offset=0)
            await client.console_write("vm1", b"hi there\n")
            seen = bytearray()
            async for frame in sub:
                assert frame.header["offset"] == len(seen)
                seen += frame.data
                if b"echo: hi there" in seen:
                    break
            assert seen.startswith(b"tick 1\n")
            await sub.close()

    asyncio.run(scenario())
    log = (root / "vm1" / "serial.log").read_bytes()
    assert b"echo: hi there" in log


def test_console_offsets_older_than_the_ring_come_from_the_log(hostd: Hostd, vmm, root: Path) -> None:
    async def scenario() -> None:
        async with AsyncHostdClient(hostd.config.socket_path) as client:
            await _console_ready(client)
            # Fill well past the 4 KiB ring through the echo.
            for n in range(100):
                await client.console_write("vm1", f"filler line {n:04d} {'x' * 40}\n".encode())
            info = (await client.call("console_info", {"vm_id": "vm1"}))[0]
            deadline = time.monotonic() + 10
            while info["base_offset"] == 0:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
                info = (await client.call("console_info", {"vm_id": "vm1"}))[0]
            sub = await client.console_attach("vm1", offset=0)
            seen = bytearray()
            async for frame in sub:
                assert frame.header["offset"] == len(seen)
                seen += frame.data
                if len(seen) >= info["end_offset"]:
                    break
            await sub.close()
            log = (root / "vm1" / "serial.log").read_bytes()
            assert bytes(seen) == log[: len(seen)]

    asyncio.run(scenario())


def test_a_console_stream_batches_in_order_across_chunk_boundaries(hostd: Hostd, vmm, root: Path) -> None:
    """A stream behind the ring takes the log a batch (STREAM_READ) at a time and sends it as
    events of at most STREAM_CHUNK: each event starts where the previous one ended, and the
    bytes are the log's, also where batches and events split lines."""
    log_path = root / "vm1" / "serial.log"
    blob = os.urandom(3 * STREAM_READ + 12345)  # not a multiple of any chunk size

    async def scenario() -> None:
        async with AsyncHostdClient(hostd.config.socket_path) as client:
            await _console_ready(client)
            with open(log_path, "ab", buffering=0) as log:  # what QEMU's logfile= does
                log.write(blob)
            size = log_path.stat().st_size
            deadline = time.monotonic() + 15
            while (await client.call("console_info", {"vm_id": "vm1"}))[0]["end_offset"] < size:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            sub = await client.console_attach("vm1", offset=0)
            seen = bytearray()
            sizes = []
            async for frame in sub:
                assert frame.header["offset"] == len(seen)  # contiguous, in order
                seen += frame.data
                sizes.append(len(frame.data))
                if len(seen) >= size:
                    break
            await sub.close()
            assert bytes(seen) == log_path.read_bytes()[: len(seen)]
            assert blob in seen
            assert max(sizes) == STREAM_CHUNK  # batched: whole chunks when the bytes are there
            assert sizes.count(STREAM_CHUNK) >= len(blob) // STREAM_CHUNK - 1

    asyncio.run(scenario())


def test_the_console_log_is_capped_and_offsets_stay_valid(root: Path, vmm) -> None:
    cap = 256 << 10
    daemon = Hostd(root, console_log_max_bytes=cap)
    daemon.start()
    log_path = root / "vm1" / "serial.log"
    line = b"".join(b"%07d " % n + b"y" * 55 + b"\n" for n in range(1024))  # 64 KiB, offsets readable
    try:

        async def scenario() -> None:
            async with AsyncHostdClient(daemon.config.socket_path) as client:
                await _console_ready(client)
                with open(log_path, "ab", buffering=0) as log:  # what QEMU's logappend=on does
                    for _ in range(64):  # 4 MiB, 16 times the cap
                        log.write(line)
                        await asyncio.sleep(0.005)
                size = log_path.stat().st_size
                deadline = time.monotonic() + 15
                while True:
                    info = (await client.call("console_info", {"vm_id": "vm1"}))[0]
                    if info["end_offset"] >= size and info["log_bytes"] <= cap:
                        break
                    assert time.monotonic() < deadline, info
                    await asyncio.sleep(0.1)
                assert info["log_start"] > 0 and info["log_dropped"] >= size - cap
                assert log_path.stat().st_blocks * 512 <= cap  # on disk: under the cap
                assert log_path.stat().st_size >= size  # offsets are file positions still
                # A replay from 0 starts where the log starts now (the gap is visible) and
                # its bytes are the log's bytes at those offsets.
                sub = await client.console_attach("vm1", offset=0)
                frame = await asyncio.wait_for(sub.__aiter__().__anext__(), 10)
                assert frame.header["offset"] == info["log_start"]
                with open(log_path, "rb") as fh:
                    fh.seek(info["log_start"])
                    assert frame.data == fh.read(len(frame.data))
                assert b"\x00" not in frame.data
                await sub.close()

        asyncio.run(scenario())
        daemon.stop()
        daemon = Hostd(root, console_log_max_bytes=cap)  # a restarted hostd finds the same start
        daemon.start()
        with daemon.client() as client:
            info = client.call("vm_register", {"vm_id": "vm1"})[0]["console"]
            assert info["log_start"] > 0 and info["log_start"] % 4096 == 0
    finally:
        daemon.stop()


@pytest.mark.parametrize(
    "mode", ["garbage", "bad-crc", "huge-length", "not-json", "not-object", "bad-fields", "bad-event"]
)
def test_a_hostile_guest_is_cut_off_and_hostd_carries_on(
    root: Path, hostd: Hostd, vmm, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    bad = _vmm(root, "evil", "--hostile", mode)
    try:
        with hostd.client() as client:
            deadline = time.monotonic() + 15
            while True:
                status = client.call("vm_status", {"vm_id": "evil"})[0]["agent"]
                if status["sessions"] >= 1 and not status["connected"] and "malformed" in status["last_error"]:
                    break
                assert time.monotonic() < deadline, status
                time.sleep(0.1)
            assert client.agent_wait("vm1", timeout=10)["protocol"] == 2  # the others are unaffected
    finally:
        os.killpg(bad.pid, signal.SIGKILL)
        bad.wait()


def _ping_latencies(client: HostdClient, seconds: float) -> list[float]:
    latencies = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        client.agent("vm1", "ping", timeout=20)
        latencies.append(time.monotonic() - started)
        time.sleep(0.05)
    return latencies


def test_a_guest_repeating_fake_frame_headers_does_not_freeze_hostd(root: Path, hostd: Hostd, vmm) -> None:
    # Before its hello answer a link resynchronises; a guest repeating a 16-byte header that
    # claims a 1 MiB frame used to cost a megabyte of CRC per byte skipped (seconds of
    # blocked event loop per read, for every VM). Now the cost is linear in bytes received.
    with hostd.client() as client:
        assert client.agent_wait("vm1", timeout=10)["protocol"] == 2
        bad = _vmm(root, "evil", "--hostile", "resync-flood")
        try:
            deadline = time.monotonic() + 15
            while client.call("vm_status", {"vm_id": "evil"})[0]["agent"]["bytes_received"] < (8 << 20):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            latencies = _ping_latencies(client, 3.0)
            status = client.call("vm_status", {"vm_id": "evil"})[0]["agent"]
        finally:
            os.killpg(bad.pid, signal.SIGKILL)
            bad.wait()
    assert max(latencies) < 1.0, latencies
    assert status["crc_bytes"] <= 2 * status["bytes_received"] + (4 << 20), status


def test_a_guest_flooding_unsolicited_frames_is_cut_off_and_counted(root: Path, vmm) -> None:
    budget = LinkBudget(window_seconds=2.0, unsolicited_bytes=4 << 20, penalty_seconds=60.0)
    daemon = Hostd(root, agent_budget=budget)
    daemon.start()
    bad = _vmm(root, "evil", "--hostile", "event-flood")
    try:
        with daemon.client() as client:
            deadline = time.monotonic() + 15
            while True:
                status = client.call("vm_status", {"vm_id": "evil"})[0]["agent"]
                if status["abuse_disconnects"] >= 1:
                    break
                assert time.monotonic() < deadline, status
                time.sleep(0.1)
            assert "unsolicited" in status["last_abuse"] and not status["connected"]
            received = status["bytes_received"]
            assert client.agent_wait("vm1", timeout=10)["protocol"] == 2  # the others are unaffected
            time.sleep(1.0)  # the penalty keeps the flooder disconnected
            status = client.call("vm_status", {"vm_id": "evil"})[0]["agent"]
            assert status["bytes_received"] == received and status["abuse_disconnects"] == 1
    finally:
        os.killpg(bad.pid, signal.SIGKILL)
        bad.wait()
        daemon.stop()


def test_a_slow_console_reader_does_not_hold_up_others(hostd: Hostd, vmm) -> None:
    async def scenario() -> None:
        slow = await AsyncHostdClient(hostd.config.socket_path).connect()
        fast = await AsyncHostdClient(hostd.config.socket_path).connect()
        try:
            await _console_ready(fast)
            await slow.console_attach("vm1", offset=0)  # never read
            sub = await fast.console_attach("vm1")

            async def write() -> None:  # concurrently: answers share the connection with the stream
                for n in range(200):
                    await fast.console_write("vm1", f"line {n} {'y' * 100}\n".encode())

            writer = asyncio.create_task(write())
            seen = bytearray()
            async for frame in sub:
                seen += frame.data
                if b"line 199 " in seen:
                    break
            await writer
        finally:
            await slow.close()
            await fast.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_concurrent_registrations_attach_a_vm_once(root: Path, monkeypatch) -> None:
    # Each registration awaits a pid check before attaching; without a re-check, racing callers
    # each attached a handle, and the later one's agent link never got QEMU's one-client socket.
    import vms.hostd.daemon as daemon_module

    real_pid_check = daemon_module.running_vmm_pid

    def slow_pid_check(runtime_dir):  # widen the window the race needs
        time.sleep(0.3)
        return real_pid_check(runtime_dir)

    monkeypatch.setattr(daemon_module, "running_vmm_pid", slow_pid_check)
    hostd = Hostd(root, scan_seconds=3600)  # no scans: the VM below is found by registration only
    hostd.start()
    late = _vmm(root, "late")
    try:

        def register(_: int) -> None:
            with hostd.client() as client:
                client.call("vm_register", {"vm_id": "late"})

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(register, range(8)))
        with hostd.client() as client:
            client.agent_wait("late", timeout=15)
            status = client.call("vm_status", {"vm_id": "late"})[0]
        assert status["agent"]["connected"] and status["agent"]["sessions"] == 1
        assert len(hostd.daemon.vms) == 1
    finally:
        hostd.stop()
        os.killpg(late.pid, signal.SIGKILL)
        late.wait()
