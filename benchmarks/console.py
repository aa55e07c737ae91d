"""Console throughput: a guest writes ``--mib`` (50) MiB to its serial console while one viewer
watches through the console websocket; real hostd (``manage.py hostd``) and daphne, a database
of its own, and the stand-in VMM of the hostd tests (tests/hostd/fake_vmm.py: a process
serving ``serial.sock`` and logging to ``serial.log`` like QEMU's ``logfile=``), not a QEMU
guest: under TCG a guest's UART would be the bottleneck, not our path.

The viewer types ``flood <bytes>`` on the console; the stand-in VMM then prints that many
bytes of 100-byte lines as fast as hostd takes them (logging each) and notes when it started
and ended. The viewer acknowledges every quarter of the server's window (flow control, as the
dashboard and the SDK do).

Prints JSON: the rate into the VMM's log, the rate at the websocket client (first flood byte
to last), their ratio, bytes the viewer lost (``gap`` messages: the bounded buffers let a slow
viewer skip, never slow the guest), the web process's RSS before and at peak, the CPU time
each process (stand-in VMM, hostd, daphne, this client) spent from the ``flood`` command to 2 s
after the last flood byte (a quiet tail: only the ticker prints), and the load average.
Not a test: nothing is asserted (target ratio >= 0.9 with bounded memory).

    .venv/bin/python benchmarks/console.py --mib 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.standin import standin_stack  # noqa: E402

DB_NAME = os.environ.get("SANDBOX_BENCH_DB", "msbx_bench_console")
MIB = 1 << 20


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


async def watch(url: str, token: str, vm_id: str, total: int, flood_json: Path, pids: dict[str, int]) -> dict:
    from websockets.asyncio.client import connect

    ws_url = url.replace("http://", "ws://") + f"/ws/vms/{vm_id}/console/"
    received = lost = 0
    first = last = None
    rss_peak = 0
    async with connect(
        ws_url, additional_headers={"Authorization": f"Bearer {token}"}, max_size=4 * MIB, open_timeout=30
    ) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert hello.get("type") == "hello" and hello.get("writer"), hello
        offset = acked = hello["offset"]
        ack_every = max(1, hello["window"] // 4)
        web_pid = pids["web"]
        cpu_before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
        own_before = os.times()
        await ws.send(json.dumps({"type": "input", "data": f"flood {total}\n"}))
        sent_at = time.monotonic()
        while True:
            now = time.monotonic()
            # Done once the VMM wrote everything and no flood line came for 2 s (its
            # ticker keeps printing a short line every 0.5 s).
            if flood_json.exists() and now - (last or sent_at) > 2:
                break
            if now - sent_at > 600:
                raise AssertionError("the flood did not end within 600 s")
            try:
                message = await asyncio.wait_for(ws.recv(), 1.0)
            except TimeoutError:
                continue
            now = time.monotonic()
            if isinstance(message, bytes):
                if b"x" * 20 in message:  # flood lines (not ticks or echoes)
                    first = first or now
                    last = now
                offset += len(message)
                received += len(message)
                if offset - acked >= ack_every:
                    acked = offset
                    await ws.send(json.dumps({"type": "ack", "offset": acked}))
                    rss_peak = max(rss_peak, _status_kib(web_pid, "VmRSS"))
            else:
                event = json.loads(message)
                if event.get("type") == "gap":
                    lost += event["to"] - event["from"]
                    offset = acked = event["to"]
                    await ws.send(json.dumps({"type": "ack", "offset": acked}))
        # After the 2 s without flood bytes: that tail adds only the ticker's lines.
        cpu_after = {name: _cpu_seconds(pid) for name, pid in pids.items()}
        own_after = os.times()
    cpu = {name: cpu_after[name] - cpu_before[name] for name in pids}
    cpu["client"] = own_after.user + own_after.system - own_before.user - own_before.system
    return {
        "received": received,
        "lost": lost,
        "first": first,
        "last": last,
        "rss_sampled_peak_kib": rss_peak,
        "cpu": cpu,
        "window": hello["window"],
        "ack_every": ack_every,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=50)
    args = parser.parse_args()
    total = args.mib * MIB
    with standin_stack(DB_NAME) as stack:
        rss_before = _status_kib(stack.web_pid, "VmRSS")
        flood_json = stack.vm_dir / "flood.json"
        pids = {name: proc.pid for name, proc in stack.procs.items()}
        seen = asyncio.run(watch(stack.url, stack.token, stack.vm_id, total, flood_json, pids))
        flood = json.loads(flood_json.read_text())
        log_rate = flood["bytes"] / MIB / (flood["ended"] - flood["started"])
        client_rate = seen["received"] / MIB / (seen["last"] - seen["first"])
        result = {
            "benchmark": "console",
            "vmm": "stand-in (tests/hostd/fake_vmm.py), real hostd and daphne",
            "flood_mib": args.mib,
            "vmm_log_rate_mib_s": round(log_rate, 1),
            "websocket_rate_mib_s": round(client_rate, 1),
            "ratio": round(client_rate / log_rate, 3),
            "received_mib": round(seen["received"] / MIB, 2),
            "lost_to_gaps_mib": round(seen["lost"] / MIB, 2),
            "web_rss_before_mib": round(rss_before / 1024, 1),
            "web_rss_sampled_peak_during_flood_mib": round(seen["rss_sampled_peak_kib"] / 1024, 1),
            "web_rss_high_water_mib": round(_status_kib(stack.web_pid, "VmHWM") / 1024, 1),
            "window_bytes": seen["window"],
            "ack_every_bytes": seen["ack_every"],
            # CPU from the flood command to 2 s after the last flood byte at the client; the
            # VMM and hostd handled every byte, daphne and the client only the bytes received.
            "cpu_seconds": {name: round(value, 2) for name, value in seen["cpu"].items()},
            "cpu_ms_per_mib_handled": {
                name: round(1000 * value / (flood["bytes"] if name in ("vmm", "hostd") else seen["received"]) * MIB, 1)
                for name, value in seen["cpu"].items()
            },
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
