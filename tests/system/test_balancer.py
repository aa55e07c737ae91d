"""Several web instances behind HAProxy (deploy/haproxy/haproxy.cfg as shipped): two daphne
processes share one database, Redis and hostd (the stand-in stack of the benchmarks: real
hostd and daphne, the real agent code behind a stand-in VMM, no QEMU). A session made on one
instance works on the other; when the instance holding a console websocket dies, the client
reconnects through the balancer to the other one and resumes from its offset: nothing the
"guest" printed is lost or repeated."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from benchmarks.standin import ROOT, StandinStack, _free_port, standin_stack

HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
FLOOD_BYTES = 400_000


@dataclass
class Balanced:
    stack: StandinStack
    url: str  # the balancer
    web2_port: int
    procs: dict[str, subprocess.Popen]

    def web2_start(self) -> None:
        daphne = str(Path(sys.executable).parent / "daphne")
        self.procs["web2"] = subprocess.Popen(
            [daphne, "-b", "127.0.0.1", "-p", str(self.web2_port), "sandbox_site.asgi:application"],
            cwd=ROOT,
            env=self.stack.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        _wait_ok(f"http://127.0.0.1:{self.web2_port}/healthz")

    def web1_kill(self) -> None:
        os.killpg(self.stack.procs["web"].pid, signal.SIGKILL)
        self.stack.procs["web"].wait(10)


def _wait_ok(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer 200 in {timeout} s")


@pytest.fixture
def balanced() -> Iterator[Balanced]:
    with standin_stack(f"msbx_balancer_{os.getpid()}") as stack:
        port, web2_port = _free_port(), _free_port()
        web1 = stack.url.removeprefix("http://")
        env = {**os.environ, "MSBX_BIND": f"127.0.0.1:{port}", "MSBX_WEB1": web1, "MSBX_WEB2": f"127.0.0.1:{web2_port}"}
        procs = {
            "haproxy": subprocess.Popen(
                ["haproxy", "-db", "-f", str(HAPROXY_CFG)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        }
        balanced = Balanced(stack, f"http://127.0.0.1:{port}", web2_port, procs)
        try:
            _wait_ok(balanced.url + "/healthz")
            yield balanced
        finally:
            for proc in procs.values():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def test_a_session_made_on_one_instance_works_on_the_other(balanced: Balanced) -> None:
    # Make the session while only web1 is up, use it when only web2 is.
    with httpx.Client(base_url=balanced.url, timeout=20, follow_redirects=False) as client:
        page = client.get("/login/")
        csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        response = client.post(
            "/login/",
            data={"username": "owner", "password": "bench-password-1", "csrfmiddlewaretoken": csrf},
            headers={"Referer": balanced.url + "/login/"},
        )
        assert response.status_code == 302, response.text[:300]
        assert client.get("/api/v1/vms/").status_code == 200
        balanced.web2_start()
        balanced.web1_kill()
        deadline = time.monotonic() + 20
        while True:  # until HAProxy's health check marks web1 down (requests are redispatched anyway)
            try:
                response = client.get("/api/v1/vms/")
            except httpx.TransportError:  # a connection web1 held as it died: that one drops
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
                continue
            if response.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert response.status_code == 200
        assert [vm["name"] for vm in response.json()["results"]] == ["bench"]


async def _read_console(ws, offset: int, chunks: list[bytes], *, until, idle: float = 5.0) -> int:
    """Take console bytes (acknowledging them) until ``until(offset)`` holds, the connection
    drops, or nothing came for ``idle`` seconds; returns the offset reached."""
    from websockets.exceptions import ConnectionClosed

    acked = offset
    deadline = time.monotonic() + 120
    while not until(offset) and time.monotonic() < deadline:
        try:
            message = await asyncio.wait_for(ws.recv(), idle)
        except (TimeoutError, ConnectionClosed):
            break
        if isinstance(message, bytes):
            chunks.append(message)
            offset += len(message)
            if offset - acked >= 32 << 10:
                acked = offset
                try:
                    await ws.send(json.dumps({"type": "ack", "offset": acked}))
                except ConnectionClosed:
                    break
        else:
            event = json.loads(message)
            assert event.get("type") != "gap", event  # nothing may be skipped here
    return offset


def test_a_console_survives_the_death_of_its_web_instance(balanced: Balanced) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidHandshake

    stack = balanced.stack
    ws_url = balanced.url.replace("http://", "ws://") + f"/ws/vms/{stack.vm_id}/console/"
    headers = {"Authorization": f"Bearer {stack.token}"}
    chunks: list[bytes] = []
    flood_json, log_path = stack.vm_dir / "flood.json", stack.vm_dir / "serial.log"

    def flood_all_seen(offset: int) -> bool:  # the flood ended and the viewer has all it wrote
        return flood_json.exists() and offset >= log_path.stat().st_size - 4096

    async def scenario() -> tuple[int, int]:
        ws = await connect(ws_url, additional_headers=headers, open_timeout=30)  # web1: the only one up
        hello = json.loads(await asyncio.wait_for(ws.recv(), 30))
        start = hello["offset"]
        await ws.send(json.dumps({"type": "input", "data": f"flood {FLOOD_BYTES}\n"}))
        reached = await _read_console(ws, start, chunks, until=lambda o: o >= start + FLOOD_BYTES // 4)
        balanced.web2_start()
        balanced.web1_kill()  # the connection dies with it (the stand-in keeps printing a tick line)
        reached = await _read_console(ws, reached, chunks, until=lambda o: False, idle=2)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 5)
        # The client reconnects through the balancer (to web2) from the offset it reached.
        deadline = time.monotonic() + 30
        while True:
            try:
                async with connect(f"{ws_url}?offset={reached}", additional_headers=headers, open_timeout=10) as ws:
                    hello = json.loads(await asyncio.wait_for(ws.recv(), 30))
                    assert hello["type"] == "hello" and hello["offset"] == reached, hello
                    reached = await _read_console(ws, reached, chunks, until=flood_all_seen)
                    return start, reached
            except (
                OSError,
                TimeoutError,
                AssertionError,
                InvalidHandshake,
            ):  # (a 502 while web1 is not yet marked down)
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1)

    start, reached = asyncio.run(scenario())
    assert flood_json.exists()
    log = log_path.read_bytes()
    received = b"".join(chunks)
    assert reached - start == len(received)
    assert received.count(b"x" * 50) >= FLOOD_BYTES // 100 - 2  # the whole flood arrived ...
    assert received == log[start : start + len(received)]  # ... in order, nothing lost or repeated
