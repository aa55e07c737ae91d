"""Snapshot benchmark (QEMU driver, one memory size, one run): medians of
- cold boot to agent-ready,
- snapshot: total time and the time the VM was paused (state saved + disk frozen),
- restore in place to agent-ready (manifest verified first, as the product does),
- clone into a new VM to agent-ready (verify + restore + new identity),
and the ratio restore / cold boot. Prints JSON. Not a test: nothing is asserted.

    .venv/bin/python benchmarks/snapshot.py --memory-mib 256 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vms.vmm.agent_client import AgentConnection, AgentTransport, agent_socket_path, wait_for_agent  # noqa: E402
from vms.vmm.base import VmSpec  # noqa: E402
from vms.vmm.image import build_image  # noqa: E402
from vms.vmm.process import detect_acceleration  # noqa: E402
from vms.vmm.qemu import QemuDriver  # noqa: E402
from vms.vmm.snapshot import disk_usage, manifest_verify, manifest_write  # noqa: E402

# Like the SANDBOX_ACCEL setting of the site: auto | kvm | tcg (the driver takes it as an argument).
ACCEL = os.environ.get("SANDBOX_ACCEL", "auto")

SERIAL = AgentTransport.VIRTIO_SERIAL


def _median(samples: list[float]) -> float:
    return round(statistics.median(samples), 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--image-dir", default=os.environ.get("SANDBOX_IMAGE_DIR", str(ROOT / "var" / "images")))
    args = parser.parse_args()

    image = build_image(Path(args.image_dir))
    driver = QemuDriver(accel=ACCEL)
    root = Path(tempfile.mkdtemp(prefix="bsnap-", dir="/tmp"))
    results: dict[str, list[float]] = {k: [] for k in ("cold", "snapshot", "pause", "restore", "clone")}
    sizes: list[int] = []

    def spec_for(name: str) -> VmSpec:
        return VmSpec(
            vm_id=name,
            runtime_dir=root / name,
            kernel=image.kernel,
            initramfs=image.initramfs,
            base_image=image.rootfs,
            memory_mib=args.memory_mib,
            max_memory_mib=args.memory_mib,
            disk_gib=2,
            cmdline=f"sandbox.hostname={name}",
        )

    try:
        for run in range(args.runs):
            spec = spec_for(f"o{run}")
            start = time.monotonic()
            driver.launch(spec)
            wait_for_agent(spec, SERIAL, 240)
            results["cold"].append(time.monotonic() - start)
            time.sleep(2)  # let the guest settle (agent, resize2fs) like a VM in use

            dest = root / f"s{run}"
            start = time.monotonic()
            meta = driver.snapshot(spec, dest, include_memory=True)
            checksum = manifest_write(dest)
            results["snapshot"].append(time.monotonic() - start)
            results["pause"].append(meta.pause_ms / 1000)
            sizes.append(disk_usage(dest))

            driver.shutdown(spec, force=True)
            start = time.monotonic()
            manifest_verify(dest, expected_checksum=checksum)
            driver.restore(spec, dest)
            wait_for_agent(spec, SERIAL, 120)
            results["restore"].append(time.monotonic() - start)

            clone = spec_for(f"c{run}")
            start = time.monotonic()
            manifest_verify(dest, expected_checksum=checksum)
            driver.restore(clone, dest)
            wait_for_agent(clone, SERIAL, 120)
            with AgentConnection.open(agent_socket_path(clone), SERIAL, timeout=10) as conn:
                conn.request(
                    "identity_set",
                    {
                        "hostname": f"c{run}",
                        "machine_id": uuid.uuid4().hex,
                        "clock_unix": time.time(),
                        "entropy": secrets.token_hex(64),
                    },
                    timeout=10,
                )
            results["clone"].append(time.monotonic() - start)
            for s in (spec, clone):
                driver.cleanup(s)
    except Exception:
        for log in sorted(root.glob("*/serial.log")):
            sys.stderr.write(f"--- {log}\n{log.read_text(errors='replace')[-3000:]}\n")
        raise
    finally:
        for entry in root.iterdir():
            if (entry / "vmm.pid").exists():
                driver.cleanup(spec_for(entry.name))
        shutil.rmtree(root, ignore_errors=True)

    out = {
        "benchmark": "snapshot",
        "driver": "qemu",
        "acceleration": detect_acceleration(ACCEL),
        "memory_mib": args.memory_mib,
        "runs": args.runs,
        "cold_boot_to_agent_s": _median(results["cold"]),
        "snapshot_total_s": _median(results["snapshot"]),
        "snapshot_pause_s": _median(results["pause"]),
        "snapshot_size_bytes": int(statistics.median(sizes)),
        "restore_to_agent_s": _median(results["restore"]),
        "clone_to_agent_s": _median(results["clone"]),
        "restore_over_cold_boot": round(statistics.median(results["restore"]) / statistics.median(results["cold"]), 3),
        "samples_s": {k: [round(v, 3) for v in vals] for k, vals in results.items()},
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
