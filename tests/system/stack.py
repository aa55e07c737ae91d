"""A real stack for end-to-end tests and benchmarks: its own PostgreSQL database, Redis, daphne, a Celery
worker and beat, and real VMs under QEMU. The test process talks to it over HTTP only.

``embedded_stack_start`` runs the embedded default instead, the way ``make run`` does: no
DATABASE_URL and no REDIS_URL (SQLite in its data directory; scripts/run.sh starts the private
Redis on a Unix socket, then hostd, daphne, the Celery worker and beat).

Networking stays in a network namespace of the stack's own (``msbx-systest-<pid>``,
``SANDBOX_NETNS`` of every process): bridges, TAPs, nftables tables and the VMMs live there, it
has no link to the host namespace, and it is removed at stop, also after a failure.

Shared by every test in tests/system (booting VMs is the slow part)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from vms.vmm.cgroups import cgroup_name, vmm_cgroup_dirs, vmm_cgroup_remove

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
# Overridable so two system-test runs on one machine do not share a database or queues.
DB_NAME = os.environ.get("SANDBOX_SYSTEST_DB", "microvm_sandbox_system")
SYSTEST_CGROUP = os.environ.get("SANDBOX_SYSTEST_CGROUP", "msbx-systest")
REDIS_DB = int(os.environ.get("SANDBOX_SYSTEST_REDIS_DB", "3"))
REDIS_PORT = int(os.environ.get("SANDBOX_SYSTEST_REDIS_PORT", "6379"))
# A Redis of its own (e.g. redis://127.0.0.1:6391/0) for a run beside others on one machine.
REDIS_URL = os.environ.get("SANDBOX_SYSTEST_REDIS_URL", f"redis://127.0.0.1:{REDIS_PORT}/{REDIS_DB}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reset_database(name: str = DB_NAME) -> None:
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def _netns_create(name: str) -> None:
    if os.path.exists(f"/run/netns/{name}"):  # left by a crashed run with a recycled pid
        pr_netns.remove(name)
    pr_netns.create(name)
    with IPRoute(netns=name) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def _netns_remove(name: str) -> None:
    if name and os.path.exists(f"/run/netns/{name}"):
        pr_netns.remove(name)


def _kill_vmms(runtime_dir: Path) -> None:
    """Kill every VMM process whose command line names our runtime directory."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if str(runtime_dir).encode() in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def vmm_pids(runtime_dir: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if str(runtime_dir).encode() in cmdline and b"qemu" in cmdline and ") Z " not in stat:
            pids.append(int(proc.name))
    return pids


@dataclass
class Stack:
    url: str
    env: dict[str, str]
    runtime_dir: Path
    log_dir: Path
    tokens: dict[str, str]
    netns: str = ""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)  # the worker's and hostd's listeners
    data_dir: Path | None = None  # the embedded stack's SANDBOX_DATA_DIR (removed at stop)

    def client(self, persona: str = "owner") -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.tokens[persona]}"}, timeout=30.0
        )

    def start(self, name: str) -> None:
        argv = {
            "web": [
                str(VENV_BIN / "daphne"),
                "-b",
                "127.0.0.1",
                "-p",
                self.url.rsplit(":", 1)[1],
                "sandbox_site.asgi:application",
            ],
            "worker": [
                str(VENV_BIN / "celery"),
                "-A",
                "sandbox_site",
                "worker",
                "-Q",
                "shared,host.systest",
                "-n",
                f"systest-{time.time_ns()}@%h",
                "--concurrency",
                "4",
                "-l",
                "INFO",
            ],
            "beat": [
                str(VENV_BIN / "celery"),
                "-A",
                "sandbox_site",
                "beat",
                "-l",
                "INFO",
                "-s",
                str(self.log_dir / "beat-schedule"),
            ],
            "hostd": [sys.executable, "manage.py", "hostd"],
            "run": ["bash", "scripts/run.sh"],  # the embedded stack: everything, as make run starts it
        }[name]
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def wait_web(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/login/", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("web server did not come up; see " + str(self.log_dir / "web.log"))

    @property
    def hostd_socket(self) -> Path:
        return self.runtime_dir / "hostd.sock"

    def wait_hostd(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.hostd_socket.exists():
                with socket.socket(socket.AF_UNIX) as s, contextlib.suppress(OSError):
                    s.connect(str(self.hostd_socket))
                    return
            time.sleep(0.1)
        raise RuntimeError("hostd did not come up; see " + str(self.log_dir / "hostd.log"))

    def wait_vm(self, vm_id: str, states: set[str], timeout: float = 180.0, persona: str = "owner") -> dict:
        deadline = time.monotonic() + timeout
        with self.client(persona) as client:
            body = {}
            while time.monotonic() < deadline:
                response = client.get(f"/api/v1/vms/{vm_id}/")
                if response.status_code == 404 and "gone" in states:
                    return {"state": "gone"}
                body = response.json()
                if body.get("state") in states:
                    return body
                time.sleep(0.5)
        raise AssertionError(f"VM {vm_id} did not reach {states}: {body}")

    def wait_operation(self, op_id: str, timeout: float = 180.0) -> dict:
        deadline = time.monotonic() + timeout
        with self.client("admin") as client:
            body = {}
            while time.monotonic() < deadline:
                body = client.get(f"/api/v1/operations/{op_id}/").json()
                if body.get("status") in ("succeeded", "failed"):
                    return body
                time.sleep(0.5)
        raise AssertionError(f"operation {op_id} did not finish: {body}")


_SEED = """
import json
from accounts.models import Role
from accounts.services import token_create, user_set_role
from django.contrib.auth import get_user_model
User = get_user_model()
out = {}
for name, role in (("admin", "admin"), ("owner", "user"), ("grantee", "user"), ("stranger", "user")):
    user = User.objects.create_user(username=name, password="system-test-password-1")
    user_set_role(user=user, role=role, actor=None)
    out[name] = token_create(user=user, name="system-tests", actor=user)[1]
from vms.models import Image, Template
broken = Image.objects.create(name="broken", status="ready", kernel_path="/nonexistent/vmlinuz",
                              initramfs_path="/nonexistent/initrd", rootfs_path="/nonexistent/rootfs.ext4")
Template.objects.create(name="broken", image=broken, vcpus=1, memory_mib=128, disk_gib=1)
print("TOKENS=" + json.dumps(out))
"""


def stack_start(work_dir: Path, log_dir: Path) -> Stack:
    """Fresh database and Redis db, migrate, build (or reuse) the image, seed users, start
    daphne + worker + beat."""
    runtime_dir = work_dir / "run"
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in log_dir.glob("*.log"):
        old.unlink()
    _reset_database()
    redis_url = REDIS_URL
    subprocess.run(["redis-cli", "-u", redis_url, "flushdb"], check=True, timeout=10, capture_output=True)
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{DB_NAME}",
        "REDIS_URL": redis_url,
        "SECRET_KEY": "system-test-secret-key",
        "DEBUG": "0",
        "SANDBOX_ENV_FILE": "/nonexistent",
        "SANDBOX_HOST_NAME": "systest",
        "SANDBOX_RUNTIME_DIR": str(runtime_dir),
        "SANDBOX_IMAGE_DIR": os.environ.get("SANDBOX_IMAGE_DIR", str(ROOT / "var" / "images")),
        "SANDBOX_RECONCILE_SECONDS": "2",
        "SANDBOX_STOP_TIMEOUT": "20",
        # A benchmark filling a busy host with VMs may need longer (benchmarks/density.py).
        "SANDBOX_BOOT_TIMEOUT": os.environ.get("SANDBOX_SYSTEST_BOOT_TIMEOUT", "150"),
        "SANDBOX_FILE_UPLOAD_MAX_BYTES": str(256 << 20),
        "SANDBOX_WORKER_METRICS_PORT": str(_free_port()),
        "SANDBOX_HOSTD_METRICS_PORT": str(_free_port()),
        "LOG_FORMAT": "json",
        # The networking test's "outside" namespace stands in for the internet; it sits in a private
        # range, which default egress denies (docs/security.md), so the operator exception opens it.
        "SANDBOX_EGRESS_EXCEPTIONS": "10.231.250.0/24",
        # Rate limits are tested in tests/security; here they would turn the schemathesis stage's
        # generated requests into 429s and leave the logic behind them untested.
        "SANDBOX_RATE_USER": "100000/min",
        "SANDBOX_RATE_ANON": "100000/min",
        "SANDBOX_RATE_EXEC": "100000/min",
        "SANDBOX_RATE_UPLOAD": "100000/min",
        "SANDBOX_RATE_CREATE": "1000/min",
        "SANDBOX_RATE_SNAPSHOT": "1000/min",
        "SANDBOX_RATE_CLONE": "1000/min",
        # VMM cgroups apart from a `make run` on the same host; removed by stack_stop.
        "SANDBOX_VMM_CGROUP": SYSTEST_CGROUP,
        # Golden snapshots only where a test builds one (tests/system/test_golden.py): the other
        # tests cold boot their VMs, and beat does not boot builders beside them.
        "SANDBOX_GOLDEN_AUTO_BUILD": "0",
        "PYTHONUNBUFFERED": "1",
    }
    netns = f"msbx-systest-{os.getpid()}"
    env["SANDBOX_NETNS"] = netns
    manage = [sys.executable, "manage.py"]
    subprocess.run([*manage, "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True, timeout=300)
    subprocess.run([*manage, "build_image"], cwd=ROOT, env=env, check=True, timeout=1800, stdout=subprocess.DEVNULL)
    seeded = subprocess.run(
        [*manage, "shell", "-c", _SEED], cwd=ROOT, env=env, check=True, timeout=120, capture_output=True, text=True
    )
    tokens = json.loads(seeded.stdout.split("TOKENS=", 1)[1])
    stack = Stack(
        url=f"http://127.0.0.1:{_free_port()}",
        env=env,
        runtime_dir=runtime_dir,
        log_dir=log_dir,
        tokens=tokens,
        netns=netns,
        metrics_ports={
            "worker": int(env["SANDBOX_WORKER_METRICS_PORT"]),
            "hostd": int(env["SANDBOX_HOSTD_METRICS_PORT"]),
        },
    )
    try:
        _netns_create(netns)
        for name in ("hostd", "web", "worker", "beat"):
            stack.start(name)
        stack.wait_web()
        stack.wait_hostd()
    except BaseException:
        stack_stop(stack)
        raise
    return stack


def _remove_vmm_cgroups(runtime_dir: Path) -> None:
    """The cgroups of the VMMs killed at the end (their VMs were never cleaned up)."""
    for vm_dir in runtime_dir.iterdir() if runtime_dir.is_dir() else []:
        if vm_dir.is_dir():
            vmm_cgroup_remove(SYSTEST_CGROUP, cgroup_name(vm_dir.name, vm_dir))
    for parent in vmm_cgroup_dirs(SYSTEST_CGROUP, ""):  # empty now: the stack's own parent goes too
        with contextlib.suppress(OSError):
            parent.rmdir()


def embedded_stack_start(log_dir: Path) -> Stack:
    """The embedded default as ``make run`` runs it: no DATABASE_URL, no REDIS_URL, a data
    directory of its own. migrate, build_image and the seed run before any Redis exists (like
    make run's steps before scripts/run.sh); then scripts/run.sh starts the private Redis on
    ``<data dir>/redis.sock``, hostd, daphne, the Celery worker and beat. Its logs (run.sh's
    ``<data dir>/log``) are ``log_dir``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in log_dir.glob("*.log"):
        old.unlink()
    # Short: VM sockets live under it (Unix socket paths are limited to 107 bytes).
    data_dir = Path(tempfile.mkdtemp(prefix="msbx-emb-", dir="/tmp")) / "var"
    data_dir.parent.chmod(0o711)  # the VMM user reaches its runtime and snapshot directories
    data_dir.mkdir()
    (data_dir / "log").symlink_to(log_dir.absolute())
    unset = ("DATABASE_URL", "REDIS_URL", "SANDBOX_RUNTIME_DIR", "SANDBOX_HOSTD_SOCKET", "SANDBOX_SNAPSHOT_DIR")
    port = _free_port()
    netns = f"msbx-systest-emb-{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if k not in unset and not k.startswith("SANDBOX_REDIS")}
    env.update(
        {
            "SECRET_KEY": "system-test-secret-key",
            "DEBUG": "0",
            "SANDBOX_ENV_FILE": "/nonexistent",
            "SANDBOX_DATA_DIR": str(data_dir),
            "SANDBOX_HOST_NAME": "systest",
            "SANDBOX_IMAGE_DIR": os.environ.get("SANDBOX_IMAGE_DIR", str(ROOT / "var" / "images")),
            "SANDBOX_RECONCILE_SECONDS": "2",
            "SANDBOX_STOP_TIMEOUT": "20",
            "SANDBOX_BOOT_TIMEOUT": "150",
            "SANDBOX_NETNS": netns,
            "SANDBOX_WORKER_METRICS_PORT": str(_free_port()),
            "SANDBOX_HOSTD_METRICS_PORT": str(_free_port()),
            "SANDBOX_VMM_CGROUP": SYSTEST_CGROUP,
            "SANDBOX_GOLDEN_AUTO_BUILD": "0",
            "BIND": "127.0.0.1",
            "PORT": str(port),
            "PYTHONUNBUFFERED": "1",
        }
    )
    manage = [sys.executable, "manage.py"]
    subprocess.run([*manage, "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True, timeout=300)
    subprocess.run([*manage, "build_image"], cwd=ROOT, env=env, check=True, timeout=1800, stdout=subprocess.DEVNULL)
    seeded = subprocess.run(
        [*manage, "shell", "-c", _SEED], cwd=ROOT, env=env, check=True, timeout=120, capture_output=True, text=True
    )
    stack = Stack(
        url=f"http://127.0.0.1:{port}",
        env=env,
        runtime_dir=data_dir / "run",
        log_dir=log_dir,
        tokens=json.loads(seeded.stdout.split("TOKENS=", 1)[1]),
        netns=netns,
        data_dir=data_dir,
    )
    try:
        _netns_create(netns)
        stack.start("run")
        stack.wait_web(timeout=120)
        stack.wait_hostd()
    except BaseException:
        stack_stop(stack)
        raise
    return stack


def stack_stop(stack: Stack) -> None:
    try:
        for name in list(stack.procs):
            stack.kill(name)
        _kill_vmms(stack.runtime_dir)
        _remove_vmm_cgroups(stack.runtime_dir)
        shutil.rmtree(stack.runtime_dir, ignore_errors=True)
        if stack.data_dir is not None:
            shutil.rmtree(stack.data_dir.parent, ignore_errors=True)  # the log symlink, not its target
    finally:
        # Bridges, TAPs and nftables tables go with the namespace once no VMM is left in it.
        _netns_remove(stack.netns)
