"""Create benchmark on a real stack (hostd, daphne, Celery worker and beat, QEMU VMs): from
``POST /api/v1/vms/`` to the first exec's answer (``POST /vms/{id}/exec/`` with ``true``),
in one run, for three templates with the same sizes and image:
- cold: ``golden_snapshot`` off, every create boots a kernel;
- golden: the template's golden snapshot is restored into each new VM;
- pool: each create takes a paused VM of the template's warm pool.
Prints JSON with p50/p90 per way and the ratios to cold. Not a test: nothing is asserted.

    .venv/bin/python benchmarks/create.py --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_TEMPLATES = """
from vms.models import Template
small = Template.objects.get(name="linux-small")
for name, golden, pool in (("bench-cold", False, 0), ("bench-golden", True, 0), ("bench-pool", True, {pool})):
    Template.objects.update_or_create(name=name, defaults=dict(
        image=small.image, vcpus=small.vcpus, max_vcpus=small.max_vcpus, memory_mib=small.memory_mib,
        max_memory_mib=small.max_memory_mib, disk_gib=small.disk_gib, max_disk_gib=small.max_disk_gib,
        kernel_cmdline=small.kernel_cmdline, golden_snapshot=golden, pool_size=pool))
"""
_POOL_READY = """
from vms.models import VM
print("READY=%d" % VM.objects.filter(purpose="pool", state="paused", template__name="bench-pool").count())
"""


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {
        "n": len(ordered),
        "p50_s": round(statistics.median(ordered), 3),
        "p90_s": round(p90, 3),
        "min_s": round(ordered[0], 3),
        "max_s": round(ordered[-1], 3),
    }


def _manage(stack, *args: str, timeout: float = 900) -> str:
    done = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=stack.env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return done.stdout


def create_to_first_exec(stack, template: str, name: str) -> tuple[float, str]:
    """Seconds from the create request to the answer of the first exec; the operation's action."""
    with stack.client() as client:
        client.timeout = 300
        started = time.monotonic()
        response = client.post("/api/v1/vms/", json={"name": name, "template": template})
        response.raise_for_status()
        vm = response.json()
        deadline = started + 300
        while True:
            answer = client.post(f"/api/v1/vms/{vm['id']}/exec/", json={"command": "true"})
            if answer.status_code == 200:
                break
            if time.monotonic() > deadline or client.get(f"/api/v1/vms/{vm['id']}/").json()["state"] == "error":
                raise RuntimeError(f"{name}: no exec answer ({answer.status_code} {answer.text[:200]})")
            time.sleep(0.02)
        elapsed = time.monotonic() - started
        action = client.get(f"/api/v1/operations/{vm['operation']}/").json()["action"]
        client.delete(f"/api/v1/vms/{vm['id']}/")
    stack.wait_vm(vm["id"], {"gone"})
    return elapsed, action


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    from tests.system.stack import stack_start, stack_stop

    os.environ["SANDBOX_GOLDEN_MAINTAIN_SECONDS"] = "5"  # the pool refills quickly between runs
    work = Path(tempfile.mkdtemp(prefix="bench-create-", dir="/tmp"))
    work.chmod(0o711)
    stack = stack_start(work, ROOT / "test-artifacts" / "bench-create")
    results: dict[str, list[float]] = {"cold": [], "golden": [], "pool": []}
    actions: dict[str, set[str]] = {k: set() for k in results}
    try:
        _manage(stack, "shell", "-c", _TEMPLATES.replace("{pool}", str(args.runs)))
        built = time.monotonic()
        _manage(stack, "golden_build", "bench-golden", "bench-pool", "--wait")
        build_seconds = time.monotonic() - built
        deadline = time.monotonic() + 600
        while f"READY={args.runs}" not in _manage(stack, "shell", "-c", _POOL_READY):
            if time.monotonic() > deadline:
                raise RuntimeError("the warm pool was not filled")
            time.sleep(2)
        for run in range(args.runs):
            for way, template in (("cold", "bench-cold"), ("golden", "bench-golden"), ("pool", "bench-pool")):
                seconds, action = create_to_first_exec(stack, template, f"{way}-{run}")
                results[way].append(seconds)
                actions[way].add(action)
    finally:
        stack_stop(stack)
    stats = {way: _stats(samples) for way, samples in results.items()}
    cold = stats["cold"]["p50_s"]
    print(
        json.dumps(
            {
                "runs": args.runs,
                "create_to_first_exec": stats,
                "operations": {way: sorted(a) for way, a in actions.items()},
                "golden_build_seconds": round(build_seconds, 1),
                "ratio_p50_golden_to_cold": round(stats["golden"]["p50_s"] / cold, 3),
                "ratio_p50_pool_to_cold": round(stats["pool"]["p50_s"] / cold, 3),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
