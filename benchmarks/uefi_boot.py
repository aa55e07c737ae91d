"""UEFI boot benchmark: the UEFI Linux image (OVMF + GRUB + systemd, agent as a systemd
service) from launch to agent-ready, N times, plus where the time goes inside the guest
(systemd's timestamps, the slowest units). Prints JSON. Not a test: nothing is asserted.

    .venv/bin/python benchmarks/uefi_boot.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vms.vmm.agent_client import AgentConnection, AgentTransport, wait_for_agent  # noqa: E402
from vms.vmm.base import BOOT_UEFI, VmSpec  # noqa: E402
from vms.vmm.image_uefi import build_uefi_image  # noqa: E402
from vms.vmm.process import detect_acceleration  # noqa: E402
from vms.vmm.qemu import QemuDriver  # noqa: E402

ACCEL = os.environ.get("SANDBOX_ACCEL", "auto")
# Monotonic timestamps (microseconds since the kernel started) systemd keeps.
_SYSTEMD_PROBE = (
    # The agent answers before the boot is finished: wait for the rest (bounded) first.
    "timeout 300 systemctl is-system-running --wait >/dev/null;"
    " systemctl show -p UserspaceTimestampMonotonic -p FinishTimestampMonotonic --value;"
    " systemctl show -p ActiveEnterTimestampMonotonic --value sandbox-agent.service;"
    " systemctl show -p ExecMainStartTimestampMonotonic --value sandbox-agent.service"
)


def _lines(sections: list[str], index: int) -> list[str]:
    return [ln.strip() for ln in sections[index].splitlines() if ln.strip()] if len(sections) > index else []


def _guest_timings(conn: AgentConnection) -> dict[str, object]:
    script = _SYSTEMD_PROBE + "; echo; systemd-analyze blame | head -8; echo; systemd-analyze critical-chain"
    started = conn.request("exec_start", {"shell": script + " sandbox-agent.service | tail -n +3"})
    conn.request("exec_wait", {"exec_id": started["exec_id"], "timeout": 330}, timeout=340)
    _, out = conn.request_data("exec_read", {"exec_id": started["exec_id"]})
    text = out.decode(errors="replace")
    lines = text.splitlines()
    userspace, finish, agent_active, agent_exec = (int(x) / 1e6 for x in lines[:4])
    sections = text.split("\n\n")  # timestamps, blame, critical chain
    return {
        "kernel_to_systemd_s": round(userspace, 2),
        "kernel_to_agent_started_s": round(agent_exec, 2),
        "kernel_to_agent_unit_active_s": round(agent_active, 2),
        "kernel_to_boot_finished_s": round(finish, 2),
        "slowest_units": _lines(sections, 1),
        "agent_critical_chain": _lines(sections, 2),
    }


def boot_once(disk: Path) -> dict[str, object]:
    driver = QemuDriver(accel=ACCEL)
    rt = Path(tempfile.mkdtemp(prefix="bench-uefi-", dir="/tmp"))
    spec = VmSpec(
        vm_id=str(uuid.uuid4()),
        runtime_dir=rt,
        kernel=Path("/nonexistent"),
        base_image=disk,
        boot_mode=BOOT_UEFI,
        memory_mib=512,
        max_memory_mib=512,
        disk_gib=2,
        cmdline="sandbox.hostname=bench",
    )
    driver.prepare(spec)
    argv = driver.build_argv(spec, acceleration=detect_acceleration(ACCEL))
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        ping = wait_for_agent(spec, AgentTransport.VIRTIO_SERIAL, 600)
        total = time.monotonic() - start
        with AgentConnection.open(spec.runtime_dir / "agent.sock", AgentTransport.VIRTIO_SERIAL, timeout=30) as conn:
            guest = _guest_timings(conn)
        # The guest's uptime at the first answer is kernel + userspace; the rest is QEMU,
        # OVMF, GRUB and loading the kernel and initramfs from the ESP.
        return {
            "launch_to_agent_s": round(total, 2),
            "guest_uptime_at_agent_s": round(float(ping["uptime_s"]), 2),
            "firmware_and_loader_s": round(total - float(ping["uptime_s"]), 2),
            **guest,
        }
    finally:
        proc.kill()
        proc.wait(timeout=30)
        shutil.rmtree(rt, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    image_dir = Path(os.environ.get("SANDBOX_IMAGE_DIR", ROOT / "var" / "images"))
    started = time.monotonic()
    art = build_uefi_image(image_dir)
    build_or_reuse = time.monotonic() - started
    manifest = json.loads((art.disk.parent / "manifest.json").read_text())
    runs = [boot_once(art.disk) for _ in range(args.runs)]
    totals = [float(r["launch_to_agent_s"]) for r in runs]  # type: ignore[arg-type]
    print(
        json.dumps(
            {
                "benchmark": "uefi_boot",
                "acceleration": detect_acceleration(ACCEL),
                "memory_mib": 512,
                "image_digest": art.digest[:12],
                "image_build_seconds": manifest.get("build_seconds"),
                "image_reuse_seconds": round(build_or_reuse, 2),
                "launch_to_agent_median_s": round(statistics.median(totals), 2),
                "runs": runs,
                "load_average": os.getloadavg(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
