"""Boot benchmark: launch to guest-agent-ready, N times each, in one run:
(a) the bare VMM command line (the QEMU driver's argv with the same image, run by hand),
(b) through the product: POST /api/v1/vms/ -> Celery worker -> driver -> agent -> ``running``.
Prints JSON with medians, p90 and the ratio b/a. Not a test: nothing is asserted.

    make benchmarks            # or: .venv/bin/python benchmarks/boot.py --runs 5
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

from vms.vmm.agent_client import AgentTransport, wait_for_agent  # noqa: E402
from vms.vmm.base import VmSpec  # noqa: E402
from vms.vmm.image import build_image  # noqa: E402
from vms.vmm.process import detect_acceleration  # noqa: E402
from vms.vmm.qemu import QemuDriver  # noqa: E402

# Like the SANDBOX_ACCEL setting of the site: auto | kvm | tcg (the driver takes it as an argument).
ACCEL = os.environ.get("SANDBOX_ACCEL", "auto")


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {
        "n": len(ordered),
        "median_s": round(statistics.median(ordered), 3),
        "p90_s": round(p90, 3),
        "min_s": round(ordered[0], 3),
        "max_s": round(ordered[-1], 3),
    }


def bare_vmm(image, runs: int, memory_mib: int) -> list[float]:
    """The same command line the driver uses, spawned directly: the floor for (b)."""
    driver = QemuDriver(accel=ACCEL)
    accel = detect_acceleration(ACCEL)
    times = []
    for _ in range(runs):
        rt = Path(tempfile.mkdtemp(prefix="bench-", dir="/tmp"))
        spec = VmSpec(
            vm_id=str(uuid.uuid4()),
            runtime_dir=rt,
            kernel=image.kernel,
            initramfs=image.initramfs,
            base_image=image.rootfs,
            memory_mib=memory_mib,
            max_memory_mib=memory_mib,
        )
        driver.prepare(spec)
        argv = driver.build_argv(spec, acceleration=accel)
        start = time.monotonic()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            wait_for_agent(spec, AgentTransport.VIRTIO_SERIAL, 180)
            times.append(time.monotonic() - start)
        finally:
            proc.kill()
            proc.wait(timeout=30)
            shutil.rmtree(rt, ignore_errors=True)
    return times


def through_api(runs: int) -> list[float]:
    from tests.system.stack import stack_start, stack_stop

    work = Path(tempfile.mkdtemp(prefix="bench-stack-"))
    work.chmod(0o711)  # the VMM user reaches the VMs' runtime directories under it
    stack = stack_start(work, ROOT / "test-artifacts" / "bench")
    times = []
    try:
        with stack.client() as client:
            for n in range(runs):
                start = time.monotonic()
                vm = client.post("/api/v1/vms/", json={"name": f"bench-{n}", "template": "linux-small"}).json()
                stack.wait_vm(vm["id"], {"running"}, timeout=300)
                times.append(time.monotonic() - start)
                client.delete(f"/api/v1/vms/{vm['id']}/")
                stack.wait_vm(vm["id"], {"gone"})
    finally:
        stack_stop(stack)
        shutil.rmtree(work, ignore_errors=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    image = build_image(Path(os.environ.get("SANDBOX_IMAGE_DIR", ROOT / "var" / "images")))
    bare = bare_vmm(image, args.runs, memory_mib=128)
    api = through_api(args.runs)
    a, b = _stats(bare), _stats(api)
    print(
        json.dumps(
            {
                "benchmark": "boot",
                "acceleration": detect_acceleration(ACCEL),
                "memory_mib": 128,
                "bare_vmm_to_agent": a,
                "api_to_running": b,
                "ratio_median_b_over_a": round(b["median_s"] / a["median_s"], 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
