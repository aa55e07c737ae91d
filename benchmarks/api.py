"""API latency at scale: 1,000 VMs (fake driver rows, nothing runs) of 100 users in a database of
its own, read by 20 concurrent clients through the web server as ``make run`` starts it
(scripts/web.py: WEB_PROCESSES daphne processes on one socket).

Each client (three quarters of them users, each owning 10 VMs, a quarter operators, who see
all 1,000) loops over the VM list, a VM's detail, the operations list and the audit list (first
pages, 50 rows) for ``--seconds``: each request as soon as its last was answered (closed loop: the
server's saturation), or with ``--rate`` at that many requests per second in all, spread evenly
over the clients (open loop: latency at a given load, counted from when a request was due).
Prints JSON: p50/p99 per endpoint and persona, requests per
second, the web processes' and the client's CPU time per request, the load average.
Not a test: nothing is asserted (target p99 < 100 ms, docs/benchmarks.md).

    .venv/bin/python benchmarks/api.py --seconds 30 --clients 20 [--processes N] [--rate R]
    .venv/bin/python benchmarks/api.py --seed-only tokens.json   # keep the database, for profiling
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psycopg  # noqa: E402

DB_NAME = os.environ.get("SANDBOX_BENCH_DB", "msbx_bench_api")
USERS, VMS_PER_USER, OPERATORS = 100, 10, 5
OPS_PER_VM, AUDIT_PER_VM = 3, 5
CLIENTS = 20  # a quarter of them operators (who see every VM), the rest owners of 10 VMs each

SEED = """
# Rows in bulk (one INSERT per table and user, not one per row), each as the services would
# write it: users with one password hash computed once, roles and tokens through the services,
# VMs with their guardian object permissions, operations, and audit events that are then sealed
# into the hash chain by the real sealer (accounts.audit.audit_chain_seal) and verified.
import json
from datetime import timedelta
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from django.contrib.contenttypes.models import ContentType
from django.contrib.auth.models import Permission
from django.utils import timezone
from guardian.models import UserObjectPermission
from accounts.audit import audit_chain_seal, audit_chain_verify
from accounts.models import AuditEvent, Role
from accounts.services import project_personal_ensure, token_create, user_set_role
from vms.models import VM, Host, Image, Operation, Template

USERS, VMS_PER_USER, OPERATORS, OPS_PER_VM, AUDIT_PER_VM = {consts}
User = get_user_model()
image = Image.objects.create(name="bench", status="ready", kernel_path="/nonexistent/vmlinuz",
                             initramfs_path="/nonexistent/initrd", rootfs_path="/nonexistent/rootfs.ext4")
template = Template.objects.create(name="bench", image=image, vcpus=1, memory_mib=128, disk_gib=1)
host = Host.objects.create(name="bench-host")
ct = ContentType.objects.get_for_model(VM)
perms = list(Permission.objects.filter(content_type=ct, codename__in=VM.object_permission_codenames()))
now = timezone.now()
password = make_password("bench-password-1")
users = User.objects.bulk_create([
    User(username=f"{{'op' if u >= USERS else 'user'}}{{u}}", password=password) for u in range(USERS + OPERATORS)
])
tokens = {{"users": [], "operators": [], "vms": {{}}}}
vm_rows, perm_rows, op_rows, audit_rows = [], [], [], []
for u, user in enumerate(users):
    operator = u >= USERS
    user_set_role(user=user, role=Role.OPERATOR if operator else Role.USER, actor=None, _audit=False)
    project = project_personal_ensure(user)  # bulk_create sends no post_save: made here
    secret = token_create(user=user, name="bench", actor=user)[1]
    tokens["operators" if operator else "users"].append(secret)
    if operator:
        continue
    vms = [
        VM(name=f"vm-{{u}}-{{i}}", owner=user, project=project, template=template, host=host, vcpus=1,
           memory_mib=128, disk_gib=1, driver="fake", state="running" if i % 2 else "stopped",
           created_at=now - timedelta(minutes=i))
        for i in range(VMS_PER_USER)
    ]
    vm_rows += vms
    tokens["vms"][secret] = [str(vm.pk) for vm in vms]
    perm_rows += [
        UserObjectPermission(user=user, permission=p, content_type=ct, object_pk=str(vm.pk))
        for vm in vms for p in perms
    ]
    op_rows += [
        Operation(vm=vm, vm_ref=vm.pk, vm_owner_id=user.pk, action="start", status="succeeded", requested_by=user,
                  log="booted\\n" * 20, created_at=now - timedelta(seconds=k))
        for vm in vms for k in range(OPS_PER_VM)
    ]
    audit_rows += [
        AuditEvent(created_at=now, actor_id=user.pk, actor_username=user.username, action="vm.start",
                   object_type="vms.vm", object_id=str(vm.pk), object_repr=vm.name, object_owner_id=user.pk,
                   after={{"n": k}}, chain_seq=None, prev_hash="", hash="")
        for vm in vms for k in range(AUDIT_PER_VM)
    ]
VM.objects.bulk_create(vm_rows, batch_size=1000)
UserObjectPermission.objects.bulk_create(perm_rows, batch_size=2000)
Operation.objects.bulk_create(op_rows, batch_size=2000)
AuditEvent.objects.bulk_create(audit_rows, batch_size=2000)
sealed = audit_chain_seal(max_rows=len(audit_rows) + 10 * len(users))
chain = audit_chain_verify()
from django.db import connection
with connection.cursor() as cursor:  # what autovacuum would have done by now on a live database
    cursor.execute("ANALYZE")
print("TOKENS=" + json.dumps({{**tokens, "audit_sealed": sealed, "audit_chain_ok": chain.ok}}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _stats(samples: list[float]) -> dict[str, float]:
    return {
        "n": len(samples),
        "p50_ms": round(statistics.median(samples) * 1000, 1),
        "p99_ms": round(_pct(samples, 0.99) * 1000, 1),
        "max_ms": round(max(samples) * 1000, 1),
    }


def _env(work: Path) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{DB_NAME}",
        "REDIS_URL": os.environ.get("SANDBOX_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"),
        "SECRET_KEY": "bench-secret-key",
        "DEBUG": "0",
        "SANDBOX_ENV_FILE": "/nonexistent",
        "SANDBOX_RUNTIME_DIR": str(work / "run"),
        "SANDBOX_RATE_USER": "1000000/min",
        "SANDBOX_RATE_ANON": "1000000/min",
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }


def seed(env: dict[str, str]) -> dict:
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True, connect_timeout=10) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
        c.execute(f'CREATE DATABASE "{DB_NAME}"')
    manage = [sys.executable, "manage.py"]
    subprocess.run([*manage, "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True, timeout=600)
    consts = repr((USERS, VMS_PER_USER, OPERATORS, OPS_PER_VM, AUDIT_PER_VM))
    seeded = subprocess.run(
        [*manage, "shell", "-c", SEED.format(consts=consts)],
        cwd=ROOT, env=env, check=True, timeout=1800, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(seeded.stdout.split("TOKENS=", 1)[1])


async def client_loop(
    client: httpx.AsyncClient, token: str, vm_ids: list[str], persona: str, until: float, out: dict, interval: float
) -> None:
    """Loop over the four endpoints until ``until``. ``interval`` 0: each request as soon as the
    last is answered (closed loop). Otherwise one request every ``interval`` seconds from a random
    phase (open loop), its latency counted from when it was due, so waiting behind a slow one
    counts too."""
    rng = random.Random(token)
    due = time.monotonic() + rng.uniform(0, interval)
    while time.monotonic() < until:
        for name, path in (
            ("vm_list", "/api/v1/vms/"),
            ("vm_detail", f"/api/v1/vms/{rng.choice(vm_ids)}/"),
            ("operations", "/api/v1/operations/"),
            ("audit", "/api/v1/audit-events/"),
        ):
            if interval:
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                start, due = due, due + interval
            else:
                start = time.monotonic()
            response = await client.get(path)
            elapsed = time.monotonic() - start
            if response.status_code != 200:
                out.setdefault("errors", []).append(f"{path}: {response.status_code}")
                continue
            out.setdefault(f"{persona}.{name}", []).append(elapsed)
            out.setdefault("timeline", []).append((start, elapsed, f"{persona}.{name}"))


def _personas(clients: int) -> tuple[int, int]:
    operators = clients // 4
    return clients - operators, operators


async def load(url: str, tokens: dict, seconds: float, clients: int, rate: float = 0.0) -> tuple[dict, float, int]:
    n_owners, n_operators = _personas(clients)
    owners = [tokens["users"][i % len(tokens["users"])] for i in range(n_owners)]
    operators = [tokens["operators"][i % len(tokens["operators"])] for i in range(n_operators)]
    all_vms = [vm for vms in tokens["vms"].values() for vm in vms]
    out: dict = {}
    async with contextlib.AsyncExitStack() as stack:
        # Every client is made before the clock starts: making one (its TLS context, even for
        # plain HTTP) blocks this event loop for tens of milliseconds, which counted as the
        # first requests' latency.
        loops = [(t, tokens["vms"][t], "owner") for t in owners] + [(t, all_vms, "operator") for t in operators]
        made = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {t}"}, timeout=30)
            )
            for t, _, _ in loops
        ]
        start = time.monotonic()
        until = start + seconds
        interval = clients / rate if rate else 0.0
        runs = zip(made, loops, strict=True)
        await asyncio.gather(*(client_loop(c, t, vms, who, until, out, interval) for c, (t, vms, who) in runs))
        elapsed = time.monotonic() - start
    timeline = out.pop("timeline", [])
    # The slowest requests and when they started (seconds into the run): stalls that hit many
    # requests at once show as one moment, a slow endpoint as one name.
    slowest = sorted(timeline, key=lambda item: -item[1])[:12]
    out["slowest"] = [(round(t - start, 2), round(1000 * e, 1), name) for t, e, name in slowest]
    return out, elapsed, sum(len(v) for k, v in out.items() if k not in ("errors", "slowest"))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` so far."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def _web_pids(pid: int) -> list[int]:
    """The daphne processes: the launcher's children, or the launcher itself (it execs daphne)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    found = [int(c) for c in children.read_text().split()] if children.exists() else []
    return found or [pid]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the clients loop (default 30)")
    parser.add_argument("--clients", type=int, default=CLIENTS, help=f"concurrent clients (default {CLIENTS})")
    parser.add_argument(
        "--processes", default=os.environ.get("WEB_PROCESSES", "0"), help="web processes (0 = one per CPU but one, 1-4)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="requests per second offered by all clients together, evenly spread (open loop; latency "
        "counted from when a request was due); default 0: closed loop, each client as fast as answered",
    )
    parser.add_argument(
        "--seed-only",
        metavar="TOKENS_JSON",
        help="seed, write the tokens and VM ids to this file, keep the database and stop (for profiling)",
    )
    args = parser.parse_args()
    if args.seed_only:
        start = time.monotonic()
        tokens = seed(_env(Path(tempfile.gettempdir())))
        Path(args.seed_only).write_text(json.dumps(tokens))
        print(json.dumps({"database": DB_NAME, "seed_s": round(time.monotonic() - start, 1)}))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-api-"))
    (work / "run").mkdir()
    env = _env(work)
    seed_start = time.monotonic()
    tokens = seed(env)
    seed_s = time.monotonic() - seed_start
    port = _free_port()
    from scripts.web import processes_wanted

    processes = str(processes_wanted(args.processes))
    log = open(work / "web.log", "wb")  # noqa: SIM115 - closed below
    # Served the way scripts/run.sh and msbx-web.service serve it (scripts/web.py).
    web = subprocess.Popen(
        [sys.executable, "scripts/web.py", "--bind", "127.0.0.1", "--port", str(port), "--processes", processes],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        asyncio.run(load(url, tokens, 3.0, args.clients))  # warm up
        pids = _web_pids(web.pid)
        web_cpu, client_cpu = _cpu_s(pids), time.process_time()
        out, elapsed, requests = asyncio.run(load(url, tokens, args.seconds, args.clients, args.rate))
        web_cpu, client_cpu = _cpu_s(pids) - web_cpu, time.process_time() - client_cpu
        errors = out.pop("errors", [])
        slowest = out.pop("slowest", [])
        result = {
            "benchmark": "api",
            "rows": {
                "users": USERS + OPERATORS,
                "vms": USERS * VMS_PER_USER,
                "operations": USERS * VMS_PER_USER * OPS_PER_VM,
                "audit_events": USERS * VMS_PER_USER * AUDIT_PER_VM,
            },
            "clients": dict(zip(("owner", "operator"), _personas(args.clients), strict=True)),
            "offered_rate": args.rate or "closed loop",
            "seconds": round(elapsed, 1),
            "requests": requests,
            "requests_per_s": round(requests / elapsed, 1),
            "errors": len(errors),
            "latency": {name: _stats(samples) for name, samples in sorted(out.items())},
            "all": _stats([s for samples in out.values() for s in samples]),
            "slowest": slowest,
            "web_processes": int(processes),
            # CPU time per request (ms): what the load left to the web server does not change it.
            "web_cpu_ms_per_request": round(1000 * web_cpu / max(requests, 1), 2),
            "client_cpu_ms_per_request": round(1000 * client_cpu / max(requests, 1), 2),
            "web_peak_rss_mib": round(sum(_rss_kib(pid) for pid in _web_pids(web.pid)) / 1024, 1),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "seed_s": round(seed_s, 1),
        }
        print(json.dumps(result, indent=2))
    finally:
        os.killpg(web.pid, signal.SIGTERM)
        web.wait(timeout=30)
        log.close()
        shutil.rmtree(work, ignore_errors=True)
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')


if __name__ == "__main__":
    main()
