"""Exec and file-transfer benchmark on a real stack (hostd, daphne, Celery, one QEMU VM):

- round trip of a trivial command (``true``, started and waited for), N times each,
  (a) directly through the host client (``vms.hostd.client.HostdClient`` -> hostd -> agent),
  (b) through the REST API (``POST /api/v1/vms/{id}/exec/`` with ``wait``),
  (c) through the websocket path: the command started on its own websocket
      (``/ws/vms/{id}/exec/``, a ``start`` frame) and followed there until its ``exit`` message;
  (d) the same websocket kept open (``"keep_open": true``): one command after another on one
      connection, as a client running many commands does (the REST path's client keeps its
      HTTP connection open too);
  (e) the websocket attach path: ``POST .../exec/`` with ``wait: false``, then the exec's
      websocket (``/ws/vms/{id}/execs/{exec_id}/``) until its ``exit`` message;
  interleaved (one of each per round) so that load from other work hits all five alike;
- upload and download throughput (MiB/s), through the host client and through the REST API.

Prints JSON (p50/p99 of each; the REST and websocket overhead over the host client, p50 and
p99, and the median of the per-round differences; with ``--vmm stand-in`` also the web
process's CPU per REST and websocket round trip, which the machine's load does not inflate
the way it inflates wall times). Not a test: nothing is asserted.

    .venv/bin/python benchmarks/exec.py --runs 100 --mib 64
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from vms.hostd.client import HostdClient  # noqa: E402
from vms.vmm.process import detect_acceleration  # noqa: E402

MIB = 1 << 20


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _stats(samples: list[float]) -> dict[str, float]:
    return {
        "n": len(samples),
        "p50_ms": round(statistics.median(samples) * 1000, 2),
        "p99_ms": round(_pct(samples, 0.99) * 1000, 2),
        "min_ms": round(min(samples) * 1000, 2),
    }


def _blocks(total_mib: int):
    block = hashlib.sha256(b"bench").digest() * (MIB // 32)
    for n in range(total_mib):
        yield n.to_bytes(8, "big") + block[8:]


def one_host_client(client: HostdClient, vm_id: str) -> float:
    start = time.monotonic()
    started = client.agent(vm_id, "exec_start", {"argv": ["true"]})[0]
    client.agent(vm_id, "exec_wait", {"exec_id": started["exec_id"], "timeout": 30}, timeout=35)
    return time.monotonic() - start


def one_api(client: httpx.Client, vm_id: str) -> float:
    start = time.monotonic()
    response = client.post(f"/api/v1/vms/{vm_id}/exec/", json={"command": ["true"], "wait": True})
    assert response.status_code == 200, response.text
    return time.monotonic() - start


def one_websocket(client: httpx.Client, stack, vm_id: str) -> float:
    """The command started on its own websocket (``/ws/vms/{id}/exec/``, a ``start`` frame)
    and followed there until its ``exit`` message: one connection, no REST call."""
    from websockets.sync.client import connect

    start = time.monotonic()
    url = stack.url.replace("http://", "ws://") + f"/ws/vms/{vm_id}/exec/"
    headers = {"Authorization": f"Bearer {stack.tokens['owner']}"}
    with connect(url, additional_headers=headers, open_timeout=30, close_timeout=5) as ws:
        _start_until_exit(ws, keep_open=False)
    return time.monotonic() - start


def one_websocket_kept(ws) -> float:
    """One command on an open start socket (``keep_open``), from its start frame to its ``exit``."""
    start = time.monotonic()
    _start_until_exit(ws, keep_open=True)
    return time.monotonic() - start


def _start_until_exit(ws, *, keep_open: bool) -> None:
    ws.send(json.dumps({"type": "start", "command": ["true"], "keep_open": keep_open}))
    for _ in range(1000):  # started, attached, output, exit: a handful of frames
        message = ws.recv(timeout=30)
        if isinstance(message, str):
            kind = json.loads(message).get("type")
            if kind == "exit":
                return
            assert kind != "error", message
    raise AssertionError("no exit message")


def one_websocket_attach(client: httpx.Client, stack, vm_id: str) -> float:
    """``POST .../exec/`` with ``wait: false``, then the exec's websocket until ``exit``."""
    from websockets.sync.client import connect

    start = time.monotonic()
    response = client.post(f"/api/v1/vms/{vm_id}/exec/", json={"command": ["true"], "wait": False})
    assert response.status_code == 202, response.text
    exec_id = response.json()["exec_id"]
    url = stack.url.replace("http://", "ws://") + f"/ws/vms/{vm_id}/execs/{exec_id}/"
    headers = {"Authorization": f"Bearer {stack.tokens['owner']}"}
    with connect(url, additional_headers=headers, open_timeout=30, close_timeout=5) as ws:
        for _ in range(1000):  # attached, output, exit: a handful of frames
            message = ws.recv(timeout=30)
            if isinstance(message, str) and json.loads(message).get("type") == "exit":
                break
        else:
            raise AssertionError("no exit message")
    return time.monotonic() - start


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU of process ``pid`` so far (0 when unknown)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def round_trips(stack, vm_id: str, runs: int, cpu: dict[str, float] | None = None) -> dict[str, list[float]]:
    """``runs`` rounds of host client, REST and websocket, one of each per round. With a
    stand-in stack, ``cpu`` gets the web process's CPU seconds spent during each path."""
    from websockets.sync.client import connect

    paths = {
        "rest_api": lambda: one_api(api, vm_id),
        "websocket": lambda: one_websocket(api, stack, vm_id),
        "websocket_kept": lambda: one_websocket_kept(kept),
        "websocket_attach": lambda: one_websocket_attach(api, stack, vm_id),
    }
    times: dict[str, list[float]] = {"host_client": [], **{name: [] for name in paths}}
    web_pid = getattr(stack, "web_pid", None)
    cpu = cpu if cpu is not None else {}
    url = stack.url.replace("http://", "ws://") + f"/ws/vms/{vm_id}/exec/"
    headers = {"Authorization": f"Bearer {stack.tokens['owner']}"}
    with (
        HostdClient(stack.hostd_socket, timeout=60) as host,
        stack.client() as api,
        connect(url, additional_headers=headers, open_timeout=30, close_timeout=5) as kept,
    ):
        for _ in range(runs):
            times["host_client"].append(one_host_client(host, vm_id))
            for name, one in paths.items():
                before = _cpu_seconds(web_pid)
                times[name].append(one())
                if web_pid is not None:
                    cpu[name] = cpu.get(name, 0.0) + _cpu_seconds(web_pid) - before
    return times


def _overhead(path: dict[str, float], host: dict[str, float]) -> dict[str, float]:
    return {
        "p50_ms": round(path["p50_ms"] - host["p50_ms"], 2),
        "p99_ms": round(path["p99_ms"] - host["p99_ms"], 2),
    }


def _paired(path: list[float], host: list[float]) -> float:
    """Median of the per-round differences (same round, same load): steadier on a busy machine."""
    return round(statistics.median(p - h for p, h in zip(path, host, strict=True)) * 1000, 2)


def transfer_host_client(socket_path: Path, vm_id: str, mib: int) -> dict[str, float]:
    with HostdClient(socket_path, timeout=300) as client:
        start = time.monotonic()
        client.upload(vm_id, "/root/bench.bin", _blocks(mib), timeout=300)
        up = time.monotonic() - start
        start = time.monotonic()
        info = client.download_open(vm_id, "/root/bench.bin")
        size = sum(len(c) for c in client.download_chunks(vm_id, info["handle"], expected_sha256=info["sha256"]))
        down = time.monotonic() - start
        client.agent(vm_id, "file_remove", {"path": "/root/bench.bin"})
    assert size == mib * MIB
    return {"upload_mib_s": round(mib / up, 1), "download_mib_s": round(mib / down, 1)}


def transfer_api(stack, vm_id: str, mib: int) -> dict[str, float]:
    auth = {"Authorization": f"Bearer {stack.tokens['owner']}"}
    url = f"/api/v1/vms/{vm_id}/files/"
    with httpx.Client(base_url=stack.url, timeout=600) as client:
        start = time.monotonic()
        r = client.put(
            url,
            params={"path": "/root/bench.bin"},
            content=_blocks(mib),
            headers={**auth, "Content-Type": "application/octet-stream", "Content-Length": str(mib * MIB)},
        )
        assert r.status_code == 201, r.text
        up = time.monotonic() - start
        start = time.monotonic()
        size = 0
        with client.stream("GET", url, params={"path": "/root/bench.bin"}, headers=auth) as response:
            for piece in response.iter_bytes():
                size += len(piece)
        down = time.monotonic() - start
        client.delete(url, params={"path": "/root/bench.bin"}, headers=auth)
    assert size == mib * MIB
    return {"upload_mib_s": round(mib / up, 1), "download_mib_s": round(mib / down, 1)}


def measure(stack, vm_id: str, runs: int, mib: int, acceleration: str) -> dict:
    round_trips(stack, vm_id, 5)  # warm up
    cpu: dict[str, float] = {}
    samples = round_trips(stack, vm_id, runs, cpu)
    times = {name: _stats(values) for name, values in samples.items()}
    host = times["host_client"]
    trips: dict = {"host_client": host}
    for name, short in (
        ("rest_api", "rest"),
        ("websocket", "websocket"),
        ("websocket_kept", "websocket_kept"),
        ("websocket_attach", "websocket_attach"),
    ):
        trips[name] = times[name]
        trips[f"{short}_overhead"] = _overhead(times[name], host)
        trips[f"{short}_overhead_paired_p50_ms"] = _paired(samples[name], samples["host_client"])
    result = {
        "benchmark": "exec",
        "acceleration": acceleration,
        "trivial_command_round_trip": trips,
        "load_average": os.getloadavg(),
    }
    if cpu:  # independent of how busy the machine is: CPU the web process spent per request
        result["web_cpu_ms_per_round_trip"] = {name: round(total / runs * 1000, 2) for name, total in cpu.items()}
    if mib > 0:
        result["transfer_mib"] = mib
        result["transfer_host_client"] = transfer_host_client(stack.hostd_socket, vm_id, mib)
        result["transfer_rest_api"] = transfer_api(stack, vm_id, mib)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--mib", type=int, default=64, help="transfer size; 0 skips the transfers")
    parser.add_argument(
        "--vmm",
        choices=["qemu", "stand-in"],
        default="qemu",
        help="qemu: the full stack and a QEMU VM; stand-in: daphne, hostd and the real agent code "
        "running on the host (benchmarks/standin.py), which measures our path without the guest",
    )
    args = parser.parse_args()
    if args.vmm == "stand-in":
        from benchmarks.standin import standin_stack

        with standin_stack("msbx_bench_exec") as stack:
            print(json.dumps(measure(stack, stack.vm_id, args.runs, args.mib, "none (stand-in VMM)"), indent=2))
        return
    from benchmarks.standin import qemu_stack

    with qemu_stack("bench-exec") as (stack, vm_id):
        print(json.dumps(measure(stack, vm_id, args.runs, args.mib, detect_acceleration()), indent=2))


if __name__ == "__main__":
    main()
