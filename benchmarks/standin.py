"""A small real stack for benchmarks that measure our own path, not a guest: a database of its
own, real hostd (``manage.py hostd``) and daphne, and one VM row whose "VMM" is the stand-in of
the hostd tests (tests/hostd/fake_vmm.py: the real guest agent code running on this host behind
``agent.sock``, and a serial port ``serial.sock`` logging to ``serial.log``). No Celery, no QEMU:
under TCG the guest would dominate what these benchmarks measure."""

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent

SEED = """
import json
from django.contrib.auth import get_user_model
from guardian.shortcuts import assign_perm
from accounts.models import Role
from accounts.services import token_create, user_set_role
from vms.models import VM, Host, Image, Template

user = get_user_model().objects.create_user(username="owner", password="bench-password-1")
user_set_role(user=user, role=Role.USER, actor=None, _audit=False)
image = Image.objects.create(name="bench", status="ready", kernel_path="/nonexistent/vmlinuz",
                             initramfs_path="/nonexistent/initrd", rootfs_path="/nonexistent/rootfs.ext4")
template = Template.objects.create(name="bench", image=image, vcpus=1, memory_mib=128, disk_gib=1)
vm = VM.objects.create(name="bench", owner=user, template=template, host=Host.objects.create(name="local"),
                       vcpus=1, memory_mib=128, disk_gib=1, driver="qemu", state="running")
for codename in VM.object_permission_codenames():
    assign_perm(f"vms.{codename}", user, vm)
print("SEED=" + json.dumps({"vm": str(vm.pk), "token": token_create(user=user, name="bench", actor=user)[1]}))
"""


@dataclass
class StandinStack:
    url: str
    token: str
    vm_id: str
    runtime_dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # the processes' environment (more web instances)

    @property
    def hostd_socket(self) -> Path:
        return self.runtime_dir / "hostd.sock"

    @property
    def vm_dir(self) -> Path:
        return self.runtime_dir / self.vm_id

    @property
    def web_pid(self) -> int:
        return self.procs["web"].pid

    @property
    def tokens(self) -> dict[str, str]:  # the shape of tests.system.stack.Stack's
        return {"owner": self.token}

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _database(name: str, *, create: bool) -> None:
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True, connect_timeout=10) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if create:
            c.execute(f'CREATE DATABASE "{name}"')


@contextlib.contextmanager
def standin_stack(db_name: str) -> Iterator[StandinStack]:
    """Start everything (fresh database ``db_name``), yield the stack, stop and remove it all."""
    # A benchmark stopped with SIGTERM still stops what it started (the finally below). Only
    # until then: under pytest the handler would otherwise outlive the stack, and a process
    # forked later (pyroute2's namespace helper) that gets SIGTERM would raise SystemExit and
    # run on as a copy of the test session.
    previous_sigterm = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="bsi-", dir="/tmp"))  # Unix socket paths are short
    runtime = work / "run"
    runtime.mkdir()
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{db_name}",
        "REDIS_URL": os.environ.get("SANDBOX_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"),
        "SECRET_KEY": "bench-secret-key",
        "DEBUG": "0",
        "SANDBOX_ENV_FILE": "/nonexistent",
        "SANDBOX_RUNTIME_DIR": str(runtime),
        "SANDBOX_HOST_NAME": "local",
        "SANDBOX_RATE_USER": "1000000/min",
        "SANDBOX_RATE_EXEC": "1000000/min",
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }
    _database(db_name, create=True)
    manage = [sys.executable, "manage.py"]
    procs: dict[str, subprocess.Popen] = {}
    logs = []
    try:
        subprocess.run([*manage, "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True, timeout=600)
        out = subprocess.run(
            [*manage, "shell", "-c", SEED], cwd=ROOT, env=env, check=True, timeout=120, capture_output=True, text=True
        )
        seed = json.loads(out.stdout.split("SEED=", 1)[1])
        vm_dir = runtime / seed["vm"]
        vm_dir.mkdir()
        (vm_dir / "spec.json").write_text("{}")
        port = _free_port()
        daphne = str(Path(sys.executable).parent / "daphne")
        for name, argv in (
            ("vmm", [sys.executable, "tests/hostd/fake_vmm.py", str(vm_dir)]),
            ("hostd", [*manage, "hostd"]),
            ("web", [daphne, "-b", "127.0.0.1", "-p", str(port), "sandbox_site.asgi:application"]),
        ):
            log = open(work / f"{name}.log", "wb")  # noqa: SIM115 - closed below
            logs.append(log)
            procs[name] = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        stack = StandinStack(url=f"http://127.0.0.1:{port}", token=seed["token"], vm_id=seed["vm"],
                             runtime_dir=runtime, procs=procs, env=env)  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if stack.hostd_socket.exists() and httpx.get(stack.url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise RuntimeError(f"the stand-in stack did not come up; see {work}/*.log")
        time.sleep(2)  # hostd's first scan attaches the VM (agent and serial port)
        yield stack
    finally:
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for log in logs:
            log.close()
        shutil.rmtree(work, ignore_errors=True)
        _database(db_name, create=False)
        signal.signal(signal.SIGTERM, previous_sigterm)


@contextlib.contextmanager
def qemu_stack(name: str) -> Iterator[tuple[object, str]]:
    """The full stack of the system tests (daphne, Celery, hostd; tests.system.stack) with one
    running linux-small QEMU VM named ``name``: yields ``(stack, vm_id)``, stops and removes it
    all afterwards."""
    from tests.system.stack import stack_start, stack_stop

    work = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    work.chmod(0o755)  # the VMM user (confinement) must reach the runtime directory below it
    stack = stack_start(work, ROOT / "test-artifacts" / name)
    try:
        with stack.client() as client:
            vm = client.post("/api/v1/vms/", json={"name": name, "template": "linux-small"}).json()
        stack.wait_vm(vm["id"], {"running"}, timeout=300)
        yield stack, vm["id"]
    finally:
        stack_stop(stack)
        shutil.rmtree(work, ignore_errors=True)
