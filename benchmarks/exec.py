"""Exec and file-transfer benchmark on a real stack (hostd, daphne, Celery, one QEMU VM):

- round trip of a trivial command (``true``, started and waited for), N times each,
  (a) directly through the host client (``vms.hostd.client.HostdClient`` -> hostd -> agent),
  (b) through the REST API (``POST /api/v1/vms/{id}/exec/`` with ``wait``);
- upload and download throughput (MiB/s), through the host client and through the REST API.

Prints JSON (p50/p99 of each, the API overhead). Not a test: nothing is asserted.

    .venv/bin/python benchmarks/exec.py --runs 100 --mib 64
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
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


def via_host_client(socket_path: Path, vm_id: str, runs: int) -> list[float]:
    times = []
    with HostdClient(socket_path, timeout=60) as client:
        for _ in range(runs):
            start = time.monotonic()
            started = client.agent(vm_id, "exec_start", {"argv": ["true"]})[0]
            client.agent(vm_id, "exec_wait", {"exec_id": started["exec_id"], "timeout": 30}, timeout=35)
            times.append(time.monotonic() - start)
    return times


def via_api(stack, vm_id: str, runs: int) -> list[float]:
    times = []
    with stack.client() as client:
        for _ in range(runs):
            start = time.monotonic()
            response = client.post(f"/api/v1/vms/{vm_id}/exec/", json={"command": ["true"], "wait": True})
            assert response.status_code == 200, response.text
            times.append(time.monotonic() - start)
    return times


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--mib", type=int, default=64)
    args = parser.parse_args()
    from tests.system.stack import stack_start, stack_stop

    work = Path(tempfile.mkdtemp(prefix="bench-exec-"))
    stack = stack_start(work, ROOT / "test-artifacts" / "bench-exec")
    try:
        with stack.client() as client:
            vm = client.post("/api/v1/vms/", json={"name": "bench-exec", "template": "linux-small"}).json()
        stack.wait_vm(vm["id"], {"running"}, timeout=300)
        via_host_client(stack.hostd_socket, vm["id"], 5)  # warm up
        via_api(stack, vm["id"], 5)
        host = _stats(via_host_client(stack.hostd_socket, vm["id"], args.runs))
        api = _stats(via_api(stack, vm["id"], args.runs))
        result = {
            "benchmark": "exec",
            "acceleration": detect_acceleration(),
            "trivial_command_round_trip": {
                "host_client": host,
                "rest_api": api,
                "api_overhead_p50_ms": round(api["p50_ms"] - host["p50_ms"], 2),
                "api_overhead_p99_ms": round(api["p99_ms"] - host["p99_ms"], 2),
            },
            "transfer_mib": args.mib,
            "transfer_host_client": transfer_host_client(stack.hostd_socket, vm["id"], args.mib),
            "transfer_rest_api": transfer_api(stack, vm["id"], args.mib),
        }
        print(json.dumps(result, indent=2))
    finally:
        stack_stop(stack)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
