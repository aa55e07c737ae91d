"""Density benchmark on a real stack (hostd, daphne, Celery, QEMU VMs): how many idle
``linux-small`` VMs one host holds and what they cost.

Creates VMs through the API (``--parallel`` booting at a time) until ``--max`` (50) run, the
host answers 409 ``host_full`` (its admission limit), the host's MemAvailable would drop
below ``--reserve-mib`` (2 GiB) with one more VM, or ``--budget`` seconds are used up.
With all of them running and idle it reports:

- per-VM memory of the VMM processes from ``/proc/<pid>/smaps_rollup``: PSS (shared pages split
  between the processes sharing them) and RSS (each process's resident pages, shared or not);
- the host's total CPU (``/proc/stat``, all processes, in % of one core and of the whole host) and
  the VMM processes' own CPU over the same window (``/proc/<pid>/stat``): on a shared machine
  only the latter is theirs alone;
- the host's KSM counters (``/sys/kernel/mm/ksm``) as the operator set them (docs/operations.md);
- the p50/p99 of a trivial exec (``POST /vms/{id}/exec/`` with ``wait``) on one VM while all run.

Prints JSON. Not a test: nothing is asserted. Every VM it made is deleted and the stack stopped
(VMMs killed, the stack's network namespace removed), also after a failure or Ctrl-C.

    .venv/bin/python benchmarks/density.py --max 50
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vms.vmm.process import detect_acceleration  # noqa: E402

TEMPLATE = "linux-small"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _meminfo_mib(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name == key:
            return int(rest.split()[0]) // 1024
    raise KeyError(key)


def _host_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _pid_cpu(pid: int) -> int:
    """utime + stime of ``pid`` in jiffies (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _rollup_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            out[parts[0].rstrip(":")] = int(parts[1])
    return out


def _ksm() -> dict[str, int]:
    out: dict[str, int] = {}
    for name in ("run", "pages_shared", "pages_sharing", "pages_unshared", "full_scans"):
        try:
            out[name] = int(Path("/sys/kernel/mm/ksm", name).read_text())
        except (OSError, ValueError):
            pass
    return out


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 1),
        "min": round(min(values), 1),
        "max": round(max(values), 1),
        "mean": round(statistics.fmean(values), 1),
    }


def fill(
    stack, created: list[str], *, max_vms: int, parallel: int, reserve_mib: int, budget_s: float, max_failures: int
) -> tuple[list[str], str, list[float], int]:
    """Create VMs until the limit (their ids go to ``created`` at once, for the clean-up);
    returns (running VM ids, why it stopped, create-to-running seconds, boots that failed).
    A boot that fails (e.g. the agent timed out on a saturated host) is counted, not retried."""
    from tests.system.stack import vmm_pids

    running: list[str] = []
    booting: dict[str, float] = {}
    boot_s: list[float] = []
    stop_reason = f"reached --max {max_vms}"
    per_vm_mib = 0
    failures = 0
    deadline = time.monotonic() + budget_s
    with stack.client() as client:
        while len(running) + len(booting) < max_vms or booting:
            full = len(running) + len(booting) >= max_vms
            if not full and time.monotonic() > deadline:
                stop_reason = f"--budget {budget_s:.0f} s for starting VMs used up"
                max_vms = len(running) + len(booting)
                continue
            if not full and len(booting) < parallel:
                available = _meminfo_mib("MemAvailable")
                if per_vm_mib == 0:
                    pids = vmm_pids(stack.runtime_dir)
                    per_vm_mib = max((_rollup_kib(p).get("Rss", 0) for p in pids), default=0) // 1024
                estimate = per_vm_mib or 384  # before the first VM ran: guest RAM + VMM overhead
                if available - estimate * (len(booting) + 1) < reserve_mib:
                    stop_reason = f"MemAvailable {available} MiB would drop below --reserve-mib {reserve_mib}"
                    max_vms = len(running) + len(booting)
                    continue
                name = f"density-{len(created)}"
                response = client.post("/api/v1/vms/", json={"name": name, "template": TEMPLATE})
                if response.status_code == 409 and response.json().get("error", {}).get("code") == "host_full":
                    stop_reason = "host admission limit (409 host_full)"
                    max_vms = len(running) + len(booting)
                    continue
                if response.status_code not in (201, 202):
                    stop_reason = f"create answered {response.status_code}: {response.text[:300]}"
                    max_vms = len(running) + len(booting)
                    continue
                created.append(response.json()["id"])
                booting[created[-1]] = time.monotonic()
                continue
            time.sleep(1.0)
            for vm_id, started in list(booting.items()):
                state = client.get(f"/api/v1/vms/{vm_id}/").json().get("state")
                if state == "running":
                    del booting[vm_id]
                    running.append(vm_id)
                    boot_s.append(time.monotonic() - started)
                    per_vm_mib = 0  # measure again with this one
                    print(f"{len(running)} running ({boot_s[-1]:.1f}s)", file=sys.stderr, flush=True)
                elif state in ("error", "stopped") or time.monotonic() - started > 600:
                    del booting[vm_id]
                    failures += 1
                    print(f"VM {vm_id} did not reach running: {state}", file=sys.stderr, flush=True)
                    if failures > max_failures:
                        stop_reason = f"more than {max_failures} boots failed"
                        max_vms = len(running) + len(booting)
    return running, stop_reason, boot_s, failures


def measure_idle(stack, settle_s: float, window_s: float) -> dict[str, object]:
    from tests.system.stack import vmm_pids

    time.sleep(settle_s)
    pids = vmm_pids(stack.runtime_dir)
    busy0, total0 = _host_cpu()
    vmm0 = {pid: _pid_cpu(pid) for pid in pids}
    started = time.monotonic()
    time.sleep(window_s)
    busy1, total1 = _host_cpu()
    elapsed = time.monotonic() - started
    vmm_pct = [100.0 * (_pid_cpu(pid) - vmm0[pid]) / CLK_TCK / elapsed for pid in pids]
    cores = os.cpu_count() or 1
    host_share = (busy1 - busy0) / max(1, total1 - total0)
    memory = [_rollup_kib(pid) for pid in pids]
    return {
        "vmm_processes": len(pids),
        "window_s": round(elapsed, 1),
        "host_cpu_pct_of_host": round(100.0 * host_share, 1),
        "host_cpu_pct_of_one_core": round(100.0 * host_share * cores, 1),
        "host_cores": cores,
        "vmm_cpu_pct_of_one_core_total": round(sum(vmm_pct), 2),
        "vmm_cpu_pct_of_one_core_per_vm": _summary(vmm_pct) if vmm_pct else {},
        "pss_mib_per_vm": _summary([m.get("Pss", 0) / 1024 for m in memory]) if memory else {},
        "rss_mib_per_vm": _summary([m.get("Rss", 0) / 1024 for m in memory]) if memory else {},
        "pss_mib_total": round(sum(m.get("Pss", 0) for m in memory) / 1024, 1),
        "host_mem_available_mib": _meminfo_mib("MemAvailable"),
        "ksm": _ksm(),
    }


def exec_p50(stack, vm_id: str, runs: int) -> dict[str, float]:
    times = []
    with stack.client() as client:
        for n in range(runs + 3):
            started = time.monotonic()
            response = client.post(f"/api/v1/vms/{vm_id}/exec/", json={"command": ["true"], "wait": True})
            if response.status_code != 200:
                raise RuntimeError(f"exec answered {response.status_code}: {response.text[:300]}")
            if n >= 3:  # the first ones warm up the path
                times.append(time.monotonic() - started)
    return {
        "n": len(times),
        "p50_ms": round(statistics.median(times) * 1000, 1),
        "p99_ms": round(_pct(times, 0.99) * 1000, 1),
    }


def delete_all(stack, created: list[str], timeout: float = 600.0) -> None:
    """Delete every VM the benchmark created (and any other of its owner) through the API and
    wait until they are gone; stack_stop kills whatever is left after ``timeout``."""
    deadline = time.monotonic() + timeout
    with stack.client() as client:
        listed = client.get("/api/v1/vms/", params={"limit": 500}).json().get("results", [])
        ids = list(dict.fromkeys([*created, *(vm["id"] for vm in listed)]))
        for vm_id in ids:
            client.delete(f"/api/v1/vms/{vm_id}/")
        for vm_id in ids:
            while time.monotonic() < deadline and client.get(f"/api/v1/vms/{vm_id}/").status_code != 404:
                time.sleep(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max", type=int, default=50, help="stop at this many running VMs")
    parser.add_argument("--parallel", type=int, default=2, help="VMs booting at the same time")
    parser.add_argument("--reserve-mib", type=int, default=2048, help="MemAvailable to leave to the host")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds to wait after the last boot")
    parser.add_argument("--window", type=float, default=60.0, help="seconds of idle CPU measurement")
    parser.add_argument("--exec-runs", type=int, default=30)
    parser.add_argument("--budget", type=float, default=3600.0, help="seconds allowed for starting VMs")
    parser.add_argument("--max-failures", type=int, default=5, help="failed boots tolerated")
    args = parser.parse_args()
    # The owner persona may hold them all (the quota is not what this measures).
    os.environ.setdefault("SANDBOX_DEFAULT_MAX_VMS", str(args.max + 5))
    os.environ.setdefault("SANDBOX_DEFAULT_MAX_VCPUS", str(args.max + 5))
    os.environ.setdefault("SANDBOX_DEFAULT_MAX_MEMORY_MIB", str((args.max + 5) * 512))
    os.environ.setdefault("SANDBOX_DEFAULT_MAX_DISK_GIB", str((args.max + 5) * 4))
    # Boots slow down as the host fills; this measures density, not boot time.
    os.environ.setdefault("SANDBOX_SYSTEST_BOOT_TIMEOUT", "600")
    from tests.system.stack import stack_start, stack_stop

    # SIGTERM (and SIGINT, whatever a library made of it) end the run through the clean-up below.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    work = Path(tempfile.mkdtemp(prefix="bench-density-"))
    work.chmod(0o711)  # the VMM user reaches the VMs' runtime directories under it
    stack = stack_start(work, ROOT / "test-artifacts" / "bench-density")
    created: list[str] = []
    try:
        started = time.monotonic()
        running, reason, boot_s, failures = fill(
            stack,
            created,
            max_vms=args.max,
            parallel=args.parallel,
            reserve_mib=args.reserve_mib,
            budget_s=args.budget,
            max_failures=args.max_failures,
        )
        fill_s = time.monotonic() - started
        if not running:
            raise RuntimeError(f"no VM started: {reason}")
        idle = measure_idle(stack, args.settle, args.window)
        result = {
            "benchmark": "density",
            "acceleration": detect_acceleration(),
            "template": TEMPLATE,
            "vms_running": len(running),
            "stopped_because": reason,
            "boots_failed": failures,
            "fill_s": round(fill_s, 1),
            "create_to_running_s": _summary(boot_s),
            "idle": idle,
            "exec_while_all_run": exec_p50(stack, running[0], args.exec_runs),
        }
        print(json.dumps(result, indent=2))
    finally:
        try:
            delete_all(stack, created)
        finally:
            stack_stop(stack)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
