"""Console throughput: a guest writes ``--mib`` (50) MiB to its serial console while one viewer
watches through the console websocket; real hostd (``manage.py hostd``) and daphne, each with a
database of its own.

- ``--vmm stand-in`` (default): the stand-in VMM of the hostd tests (tests/hostd/fake_vmm.py: a
  process serving ``serial.sock`` and logging to ``serial.log`` like QEMU's ``logfile=``). The
  viewer types ``flood <bytes>`` on the console; the stand-in then prints that many bytes of
  100-byte lines as fast as hostd takes them (logging each) and notes when it started and
  ended. This measures our path at a rate no emulated UART reaches.
- ``--vmm qemu``: the full stack (``tests.system.stack``: daphne, Celery, hostd) and a real
  linux-small QEMU guest. The viewer types ``head -c <bytes> /dev/zero | tr ... | fold -w 99``
  on the guest's root shell (ttyS0), so the guest's kernel writes the bytes through its 16550
  UART into QEMU, which logs them to ``serial.log``; the rate into the log comes from watching
  the file's size (every 2 ms, from the first 4 KiB of output to its last growth).

The viewer acknowledges every quarter of the server's window (flow control, as the dashboard
and the SDK do).

Prints JSON: the rate into the VMM's log, the rate at the websocket client (first flood byte
to last), their ratio, bytes the viewer lost (``gap`` messages: the bounded buffers let a slow
viewer skip, never slow the guest), the web process's RSS before and at peak, the CPU time
each process (stand-in VMM, hostd, daphne, this client) spent from the ``flood`` command to 2 s
after the last flood byte (a quiet tail: only the ticker prints), and the load average.
Not a test: nothing is asserted (target ratio >= 0.9 with bounded memory).

    .venv/bin/python benchmarks/console.py --mib 50
    .venv/bin/python benchmarks/console.py --vmm qemu --mib 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
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


class StandinFlood:
    """The stand-in VMM prints ``total`` bytes on ``flood <total>`` and writes when it started and
    ended (and how much) to ``flood.json``."""

    def __init__(self, vm_dir: Path, total: int) -> None:
        self.flood_json = vm_dir / "flood.json"
        self.command = f"flood {total}\n"

    def start(self) -> None:
        pass

    def finished(self) -> bool:
        return self.flood_json.exists()

    def log_bytes_and_seconds(self) -> tuple[int, float]:
        flood = json.loads(self.flood_json.read_text())
        return flood["bytes"], flood["ended"] - flood["started"]


class GuestFlood:
    """A QEMU guest's root shell prints ``total`` x's in 99-character lines; the rate into the log
    is read off ``serial.log``'s size, polled every 2 ms by a thread."""

    START_BYTES = 4096  # the typed command's echo and the prompt stay below this

    def __init__(self, log_path: Path, total: int) -> None:
        self.log_path = log_path
        self.total = total
        self.command = f"head -c {total} /dev/zero | tr '\\0' x | fold -w 99; echo\n"
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def start(self) -> None:
        self.baseline = self.log_path.stat().st_size
        self._thread.start()

    def _poll(self) -> None:
        size = self.baseline
        while not self._stop.wait(0.002):
            now_size = self.log_path.stat().st_size
            if now_size != size:
                size = now_size
                self.samples.append((time.monotonic(), size))

    def finished(self) -> bool:
        return bool(self.samples) and self.samples[-1][1] - self.baseline >= self.total

    def log_bytes_and_seconds(self) -> tuple[int, float]:
        self._stop.set()
        self._thread.join(timeout=5)
        started, size0 = next((t, n) for t, n in self.samples if n - self.baseline >= self.START_BYTES)
        ended, size1 = self.samples[-1]
        return size1 - size0, ended - started


async def watch(url: str, token: str, vm_id: str, total: int, flood, pids: dict[str, int]) -> dict:
    from websockets.asyncio.client import connect

    ws_url = url.replace("http://", "ws://") + f"/ws/vms/{vm_id}/console/"
    received = lost = flood_received = 0  # flood_received: from the first flood byte on
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
        flood.start()
        await ws.send(json.dumps({"type": "input", "data": flood.command}))
        sent_at = time.monotonic()
        while True:
            now = time.monotonic()
            # Done once the VMM wrote everything and no flood line came for 2 s (its
            # ticker keeps printing a short line every 0.5 s).
            if flood.finished() and now - (last or sent_at) > 2:
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
                if first is not None:
                    flood_received += len(message)
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
        "flood_received": flood_received,
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
    parser.add_argument(
        "--vmm",
        choices=("stand-in", "qemu"),
        default="stand-in",
        help="stand-in: hostd and daphne with the stand-in VMM; qemu: the full stack and a QEMU guest",
    )
    args = parser.parse_args()
    total = args.mib * MIB
    if args.vmm == "stand-in":
        with standin_stack(DB_NAME) as stack:
            pids = {name: proc.pid for name, proc in stack.procs.items()}
            flood = StandinFlood(stack.vm_dir, total)
            vmm = "stand-in (tests/hostd/fake_vmm.py), real hostd and daphne"
            print(json.dumps(measure(stack, stack.web_pid, pids, flood, total, args.mib, vmm), indent=2))
        return
    from benchmarks.standin import qemu_stack
    from tests.system.stack import vmm_pids
    from vms.vmm.process import detect_acceleration

    with qemu_stack("bench-console") as (stack, vm_id):
        (vmm_pid,) = vmm_pids(stack.runtime_dir)
        pids = {"vmm": vmm_pid, "hostd": stack.procs["hostd"].pid, "web": stack.procs["web"].pid}
        flood = GuestFlood(stack.runtime_dir / vm_id / "serial.log", total)
        vmm = f"QEMU guest (linux-small, {detect_acceleration()}), full stack"
        print(json.dumps(measure(stack, pids["web"], pids, flood, total, args.mib, vmm, vm_id=vm_id), indent=2))


def measure(stack, web_pid: int, pids: dict[str, int], flood, total: int, mib: int, vmm: str, vm_id: str = "") -> dict:
    rss_before = _status_kib(web_pid, "VmRSS")
    token = stack.tokens["owner"]
    seen = asyncio.run(watch(stack.url, token, vm_id or stack.vm_id, total, flood, pids))
    log_bytes, log_seconds = flood.log_bytes_and_seconds()
    log_rate = log_bytes / MIB / log_seconds
    client_rate = seen["flood_received"] / MIB / (seen["last"] - seen["first"])
    return {
        "benchmark": "console",
        "vmm": vmm,
        "flood_mib": mib,
        "vmm_log_rate_mib_s": round(log_rate, 2),
        "websocket_rate_mib_s": round(client_rate, 2),
        "ratio": round(client_rate / log_rate, 3),
        "received_mib": round(seen["received"] / MIB, 2),
        "lost_to_gaps_mib": round(seen["lost"] / MIB, 2),
        "web_rss_before_mib": round(rss_before / 1024, 1),
        "web_rss_sampled_peak_during_flood_mib": round(seen["rss_sampled_peak_kib"] / 1024, 1),
        "web_rss_high_water_mib": round(_status_kib(web_pid, "VmHWM") / 1024, 1),
        "window_bytes": seen["window"],
        "ack_every_bytes": seen["ack_every"],
        # CPU from the flood command to 2 s after the last flood byte at the client; the
        # VMM and hostd handled every byte, daphne and the client only the bytes received.
        "cpu_seconds": {name: round(value, 2) for name, value in seen["cpu"].items()},
        "cpu_ms_per_mib_handled": {
            name: round(1000 * value / (log_bytes if name in ("vmm", "hostd") else seen["received"]) * MIB, 1)
            for name, value in seen["cpu"].items()
        },
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


if __name__ == "__main__":
    main()
