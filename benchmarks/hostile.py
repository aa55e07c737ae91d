"""Hostile-guest benchmark: exec latency on VM A while VM B floods its agent channel.

Boots two QEMU VMs (TCG here) with an in-process hostd (no Django, no database). In B, a
script started from the serial console kills the guest agent, takes the virtio-serial
port and writes a fake 16-byte frame header (claiming a 1 MiB frame) over and over: the
resynchronisation attack that used to cost hostd a megabyte of CRC per byte skipped.
Meanwhile exec round trips (``exec_start`` of ``true`` + ``exec_wait``) run on A.

Prints JSON: quiet and flooded p50/p99 on A, their ratio, and what B's link cost hostd
(bytes received, bytes run through CRC, disconnects for abuse). Not a test.

    .venv/bin/python benchmarks/hostile.py --runs 30 --flood-seconds 40
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vms.hostd.client import HostdClient  # noqa: E402
from vms.hostd.daemon import HostDaemon, HostdConfig  # noqa: E402
from vms.vmm.base import VmSpec  # noqa: E402
from vms.vmm.image import build_image  # noqa: E402
from vms.vmm.qemu import QemuDriver  # noqa: E402

FLOOD_SCRIPT = r"""
import glob, os, time
deadline = time.time() + {seconds}
junk = (b"SBX2" + (2).to_bytes(4, "big") + ((1 << 20) - 2).to_bytes(4, "big") + bytes(4)) * 4096
dev = None
for f in glob.glob("/sys/class/virtio-ports/*/name"):
    if open(f).read().strip() == "org.microvm_sandbox.agent.0":
        dev = "/dev/" + f.split("/")[-2]
def kill_agent():
    for cmd in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            if b"sandbox_agent" in open(cmd, "rb").read():  # run as a file or as a module
                os.kill(int(cmd.split("/")[2]), 9)
        except OSError:
            pass
while time.time() < deadline:
    kill_agent()
    try:
        fd = os.open(dev, os.O_WRONLY)
    except OSError:
        time.sleep(0.05)
        continue
    try:
        while time.time() < deadline:
            os.write(fd, junk)
    except OSError:
        pass
    os.close(fd)
"""


class InProcessHostd:
    """hostd on its own event loop thread, over ``root`` (a runtime directory of VMs)."""

    def __init__(self, root: Path, **config: object) -> None:
        self.config = HostdConfig(runtime_dir=root, socket_path=root / "hostd.sock", scan_seconds=0.5, **config)  # type: ignore[arg-type]
        self.loop = asyncio.new_event_loop()
        self.daemon = HostDaemon(self.config)
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.daemon.start())
            ready.set()
            self.loop.run_until_complete(self.daemon._stopped.wait())
            self.loop.run_until_complete(self.daemon.stop())

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        if not ready.wait(20):
            raise RuntimeError("hostd did not start")

    def client(self, timeout: float = 60.0) -> HostdClient:
        return HostdClient(self.config.socket_path, timeout=timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.daemon.request_stop)
        self.thread.join(20)


def exec_round_trip(client: HostdClient, vm_id: str) -> float:
    started = time.monotonic()
    result, _ = client.agent(vm_id, "exec_start", {"argv": ["true"]}, timeout=60)
    client.agent(vm_id, "exec_wait", {"exec_id": result["exec_id"], "timeout": 60}, timeout=70)
    return time.monotonic() - started


def start_agent_flood(client: HostdClient, vm_id: str, seconds: float) -> None:
    """From B's root shell on its serial console: kill the agent, flood its port."""
    script = base64.b64encode(FLOOD_SCRIPT.format(seconds=seconds).encode()).decode()
    client.call("console_write", {"vm_id": vm_id}, f"echo {script} | base64 -d > /tmp/flood.py\n".encode())
    client.call("console_write", {"vm_id": vm_id}, b"setsid python3 /tmp/flood.py </dev/null >/dev/null 2>&1 &\n")


def wait_flooding(client: HostdClient, vm_id: str, min_bytes: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = client.call("vm_status", {"vm_id": vm_id})[0]["agent"]
        if status["bytes_received"] >= min_bytes:  # an honest agent sent a few KiB so far
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"the flood did not start: {status}")
        time.sleep(0.2)


def stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "n": len(samples),
        "p50_ms": round(statistics.median(samples) * 1000, 1),
        "p99_ms": round(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


def boot_pair(root: Path, image_dir: Path) -> tuple[QemuDriver, list[VmSpec]]:
    image = build_image(image_dir, progress=lambda msg: None)
    driver = QemuDriver()
    specs = [
        VmSpec(
            vm_id=name,
            runtime_dir=root / name,
            kernel=image.kernel,
            initramfs=image.initramfs,
            base_image=image.rootfs,
            disk_gib=2,
        )
        for name in ("vma", "vmb")
    ]
    for spec in specs:
        driver.launch(spec)
    return driver, specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--flood-seconds", type=float, default=40.0)
    parser.add_argument("--image-dir", type=Path, default=ROOT / "var" / "images")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bh-", dir="/tmp"))
    driver, specs = boot_pair(root, args.image_dir)
    hostd = InProcessHostd(root)
    try:
        with hostd.client() as client:
            for spec in specs:
                client.agent_wait(spec.vm_id, timeout=240)
            quiet = [exec_round_trip(client, "vma") for _ in range(args.runs)]
            start_agent_flood(client, "vmb", args.flood_seconds)
            wait_flooding(client, "vmb", 4 << 20)
            flooded = []
            end = time.monotonic() + args.flood_seconds - 5
            while len(flooded) < args.runs and time.monotonic() < end:
                flooded.append(exec_round_trip(client, "vma"))
            link = client.call("vm_status", {"vm_id": "vmb"})[0]["agent"]
        q, f = stats(quiet), stats(flooded)
        print(
            json.dumps(
                {
                    "quiet": q,
                    "flooded": f,
                    "p50_ratio": round(f["p50_ms"] / q["p50_ms"], 2),
                    "flooder_link": {
                        k: link[k] for k in ("bytes_received", "crc_bytes", "abuse_disconnects", "last_error")
                    },
                },
                indent=2,
            )
        )
    finally:
        hostd.stop()
        for spec in specs:
            driver.cleanup(spec)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
