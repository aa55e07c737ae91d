"""A multi-host stack on one machine: two hypervisor hosts, two web instances behind HAProxy,
real VMs under QEMU. The test process talks to it over HTTP (through the balancer) only.

What runs where (how the simulation maps to real machines):

- **Hosts** ``h1`` and ``h2``. Each has what a hypervisor machine has: its own network namespace
  (``msbx-mh<pid>-<host>``, the host's ``SANDBOX_NETNS``: its bridges, TAPs, nftables tables
  and VMMs live there), its own runtime and snapshot directories, its own VMM cgroup, its own
  hostd (a Unix socket for its worker, and the mutual-TLS listener on ``127.0.0.1:<port>``
  that web instances use, as ``manage.py host_join`` set up) and its own Celery worker for
  ``host.<name>`` (h1's also takes ``shared``), each with ``SANDBOX_HOST_NAME`` set.
- **Underlay**: the two host namespaces are joined by a veth link (``10.231.98.1``/``.2``),
  their tunnel addresses (``--tunnel-address``): a network whose VMs are on both hosts spans
  them over VXLAN through that link.
- **Control plane**: two daphne instances (``SANDBOX_HOST_NAME=control``: no VM is ever on
  "their" machine, so every stream goes to a host's hostd over TLS), beat, HAProxy
  (deploy/haproxy/haproxy.cfg as shipped), PostgreSQL and Redis on 127.0.0.1.

The simplifications of one machine: every control process and hostd runs in the root
namespace (their *VM networking* is in the host's namespace, as ``SANDBOX_NETNS`` does for
one host); hostd's TLS listeners are on 127.0.0.1 instead of each host's own address; the
PKI directory, the image directory and the filesystem are shared (so "disk" and capacity are
this machine's, reported by both hosts). No packet leaves the namespaces the stack creates
and 127.0.0.1.

For later tests (drain, migration): ``start(name, host=)``, ``kill(name, host=, sig=)`` and
``restart`` act on one process of one host (``hostd``, ``worker``) or of the control plane
(``web1``, ``web2``, ``beat``, ``haproxy``); ``add_host`` starts a further host.
Everything is stopped by ``multihost_stop``: processes, VMMs, cgroups, namespaces, directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pyroute2 import IPRoute

from tests.system.stack import (
    _SEED,
    DB_NAME,
    REDIS_DB,
    REDIS_PORT,
    ROOT,
    SYSTEST_CGROUP,
    VENV_BIN,
    _free_port,
    _kill_vmms,
    _netns_create,
    _netns_remove,
    _reset_database,
)
from vms.vmm.cgroups import cgroup_name, vmm_cgroup_dirs, vmm_cgroup_remove

HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
# A database and Redis db of its own: the single-host stack (session-wide, tests/system/conftest.py)
# may still run while this module's stack does (its broker's "shared" queue must not be theirs).
MH_DB_NAME = f"{DB_NAME}_mh"
MH_REDIS_URL = os.environ.get("SANDBOX_SYSTEST_MH_REDIS_URL", f"redis://127.0.0.1:{REDIS_PORT}/{(REDIS_DB + 1) % 16}")
UNDERLAY_PREFIX = "10.231.98."  # the hosts' tunnel addresses: .1, .2, ...
UNDERLAY_MTU = 1500


@dataclass
class HostNode:
    """One simulated hypervisor host."""

    name: str
    index: int
    netns: str
    work_dir: Path
    env: dict[str, str]
    tls_port: int
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def tunnel_address(self) -> str:
        return f"{UNDERLAY_PREFIX}{self.index}"

    @property
    def runtime_dir(self) -> Path:
        return Path(self.env["SANDBOX_RUNTIME_DIR"])

    @property
    def hostd_socket(self) -> Path:
        return self.runtime_dir / "hostd.sock"

    @property
    def cgroup(self) -> str:
        return self.env["SANDBOX_VMM_CGROUP"]


@dataclass
class MultiHostStack:
    url: str  # the balancer
    web_urls: dict[str, str]  # web1, web2 -> their own address
    env: dict[str, str]  # the control plane's
    work_dir: Path
    log_dir: Path
    tokens: dict[str, str]
    hosts: dict[str, HostNode] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)  # control plane
    haproxy_port: int = 0

    # ----- clients --------------------------------------------------------------------

    def client(self, persona: str = "owner", via: str | None = None, timeout: float = 30.0) -> httpx.Client:
        """An API client for ``persona``, through the balancer or straight to ``via`` (web1/web2)."""
        return httpx.Client(
            base_url=self.web_urls[via] if via else self.url,
            headers={"Authorization": f"Bearer {self.tokens[persona]}"},
            timeout=timeout,
        )

    def ws_url(self, path: str, via: str | None = None) -> str:
        return (self.web_urls[via] if via else self.url).replace("http://", "ws://") + path

    # ----- processes ------------------------------------------------------------------

    def _argv(self, name: str, host: HostNode | None) -> list[str]:
        if host is not None:
            if name == "hostd":
                return [sys.executable, "manage.py", "hostd"]
            if name == "worker":
                queues = f"host.{host.name}" + (",shared" if host.index == 1 else "")
                return [
                    str(VENV_BIN / "celery"), "-A", "sandbox_site", "worker", "-Q", queues,
                    "-n", f"{host.name}-{time.time_ns()}@%h", "--concurrency", "3", "-l", "INFO",
                ]  # fmt: skip
            raise ValueError(f"no host process {name!r}")
        if name in self.web_urls:
            port = self.web_urls[name].rsplit(":", 1)[1]
            return [str(VENV_BIN / "daphne"), "-b", "127.0.0.1", "-p", port, "sandbox_site.asgi:application"]
        if name == "beat":
            return [
                str(VENV_BIN / "celery"), "-A", "sandbox_site", "beat", "-l", "INFO",
                "-s", str(self.work_dir / "beat-schedule"),
            ]  # fmt: skip
        if name == "haproxy":
            return ["haproxy", "-db", "-f", str(HAPROXY_CFG)]
        raise ValueError(f"no control process {name!r}")

    def start(self, name: str, host: str | None = None) -> None:
        node = self.hosts[host] if host else None
        procs = node.procs if node else self.procs
        if name in procs and procs[name].poll() is None:
            raise RuntimeError(f"{name} of {host or 'control'} runs already")
        env = node.env if node else self.env
        if name == "haproxy":
            env = {
                **os.environ,
                "MSBX_BIND": f"127.0.0.1:{self.haproxy_port}",
                "MSBX_WEB1": self.web_urls["web1"].removeprefix("http://"),
                "MSBX_WEB2": self.web_urls["web2"].removeprefix("http://"),
            }
        log = open(self.log_dir / f"{host + '-' if host else ''}{name}.log", "ab")  # noqa: SIM115 - closed with the process
        procs[name] = subprocess.Popen(
            self._argv(name, node),
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self, name: str, host: str | None = None, sig: int = signal.SIGTERM) -> None:
        """Stop one process (its whole process group) and wait for it."""
        procs = self.hosts[host].procs if host else self.procs
        proc = procs.pop(name, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def restart(self, name: str, host: str | None = None) -> None:
        self.kill(name, host)
        self.start(name, host)
        if name == "hostd" and host:
            self.wait_hostd(host)
        elif name in self.web_urls:
            wait_ok(self.web_urls[name] + "/healthz")

    def add_host(self, name: str) -> HostNode:
        """A further host: its namespace on the underlay, joined (certificate, addresses), its
        hostd and worker started. Waits until it is up."""
        node = _host_prepare(self, name, len(self.hosts) + 1)
        self.start("hostd", name)
        self.start("worker", name)
        self.wait_hostd(name)
        self.wait_hosts_up([name])
        return node

    # ----- waits ----------------------------------------------------------------------

    def wait_hostd(self, host: str, timeout: float = 30.0) -> None:
        path = self.hosts[host].hostd_socket
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                with socket.socket(socket.AF_UNIX) as s, contextlib.suppress(OSError):
                    s.connect(str(path))
                    return
            time.sleep(0.1)
        raise RuntimeError(f"hostd of {host} did not come up; see {self.log_dir / f'{host}-hostd.log'}")

    def host_rows(self) -> dict[str, dict]:
        with self.client("admin") as client:
            response = client.get("/api/v1/hosts/", params={"page_size": 100})
        assert response.status_code == 200, response.text
        body = response.json()
        return {h["name"]: h for h in (body["results"] if isinstance(body, dict) else body)}

    def wait_hosts_up(self, names: list[str], timeout: float = 90.0, up: bool = True) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        rows: dict[str, dict] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, AssertionError):
                rows = self.host_rows()
                if all(n in rows and rows[n]["up"] is up for n in names):
                    return rows
            time.sleep(0.5)
        raise AssertionError(f"hosts {names} not {'up' if up else 'down'}: {rows}")

    def wait_vm(self, vm_id: str, states: set[str], timeout: float = 240.0, persona: str = "owner") -> dict:
        deadline = time.monotonic() + timeout
        body: dict = {}
        with self.client(persona) as client:
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    response = client.get(f"/api/v1/vms/{vm_id}/")
                    if response.status_code == 404 and "gone" in states:
                        return {"state": "gone"}
                    body = response.json()
                    if body.get("state") in states:
                        return body
                time.sleep(0.5)
        raise AssertionError(f"VM {vm_id} did not reach {states}: {body}")


def wait_ok(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer 200 in {timeout} s")


def _manage(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=timeout,
        capture_output=True,
        text=True,
    )


def _underlay_attach(stack: MultiHostStack, node: HostNode) -> None:
    """Link the new host's namespace to every host before it (a veth pair per pair of hosts,
    /32 routes to each peer's tunnel address): the underlay network of the hypervisors."""
    for peer in stack.hosts.values():
        if peer is node:
            continue
        a, b = f"ul{node.index}-{peer.index}", f"ul{peer.index}-{node.index}"
        with IPRoute(netns=node.netns) as ipr:
            ipr.link("add", ifname=a, kind="veth", peer=b)
            ipr.link("set", index=ipr.link_lookup(ifname=b)[0], net_ns_fd=peer.netns)
        for ns, dev, own, other in ((node.netns, a, node, peer), (peer.netns, b, peer, node)):
            with IPRoute(netns=ns) as ipr:
                index = ipr.link_lookup(ifname=dev)[0]
                if not ipr.get_addr(address=own.tunnel_address):
                    ipr.addr("add", index=index, address=own.tunnel_address, prefixlen=32)
                ipr.link("set", index=index, state="up", mtu=UNDERLAY_MTU)
                ipr.route("add", dst=f"{other.tunnel_address}/32", oif=index)


def _host_prepare(stack: MultiHostStack, name: str, index: int) -> HostNode:
    work = stack.work_dir / name
    (work / "run").mkdir(parents=True, exist_ok=True)
    (work / "snapshots").mkdir(parents=True, exist_ok=True)
    tls_port = _free_port()
    netns = f"msbx-mh{os.getpid()}-{name}"
    env = {
        **stack.env,
        "SANDBOX_HOST_NAME": name,
        "SANDBOX_NETNS": netns,
        "SANDBOX_RUNTIME_DIR": str(work / "run"),
        "SANDBOX_SNAPSHOT_DIR": str(work / "snapshots"),
        "SANDBOX_VMM_CGROUP": f"{SYSTEST_CGROUP}-{name}",
        "SANDBOX_TUNNEL_ADDRESS": f"{UNDERLAY_PREFIX}{index}",
        "SANDBOX_HOSTD_TLS_LISTEN": f"127.0.0.1:{tls_port}",
        "SANDBOX_WORKER_METRICS_PORT": str(_free_port()),
        "SANDBOX_HOSTD_METRICS_PORT": str(_free_port()),
    }
    node = HostNode(name=name, index=index, netns=netns, work_dir=work, env=env, tls_port=tls_port)
    stack.hosts[name] = node
    _netns_create(netns)
    _underlay_attach(stack, node)
    _manage(stack.env, "host_join", name, "--address", f"127.0.0.1:{tls_port}", "--tunnel-address", node.tunnel_address)
    return node


def multihost_start(work_dir: Path, log_dir: Path, hosts: tuple[str, ...] = ("h1", "h2")) -> MultiHostStack:
    """Fresh database and Redis db, migrate, image, seed; the hosts (namespaces, underlay,
    join, hostd, worker), two web instances, beat and HAProxy. Waits until every host is up."""
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in log_dir.glob("*.log"):
        old.unlink()
    _reset_database(MH_DB_NAME)
    subprocess.run(["redis-cli", "-u", MH_REDIS_URL, "flushdb"], check=True, timeout=10, capture_output=True)
    control_dir = work_dir / "control"
    (control_dir / "run").mkdir(parents=True)
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{MH_DB_NAME}",
        "REDIS_URL": MH_REDIS_URL,
        "SECRET_KEY": "system-test-secret-key",
        "DEBUG": "0",
        "SANDBOX_ENV_FILE": "/nonexistent",
        "SANDBOX_HOST_NAME": "control",
        "SANDBOX_RUNTIME_DIR": str(control_dir / "run"),
        "SANDBOX_SNAPSHOT_DIR": str(control_dir / "snapshots"),
        "SANDBOX_PKI_DIR": str(work_dir / "pki"),
        "SANDBOX_IMAGE_DIR": os.environ.get("SANDBOX_IMAGE_DIR", str(ROOT / "var" / "images")),
        "SANDBOX_RECONCILE_SECONDS": "2",
        "SANDBOX_HOST_DOWN_SECONDS": "8",
        "SANDBOX_STOP_TIMEOUT": "20",
        "SANDBOX_BOOT_TIMEOUT": os.environ.get("SANDBOX_SYSTEST_BOOT_TIMEOUT", "200"),
        "SANDBOX_FILE_UPLOAD_MAX_BYTES": str(256 << 20),
        "SANDBOX_WORKER_METRICS_PORT": str(_free_port()),
        "SANDBOX_HOSTD_METRICS_PORT": str(_free_port()),
        "SANDBOX_BEHIND_PROXY": "1",
        "SANDBOX_VMM_CGROUP": f"{SYSTEST_CGROUP}-control",
        "SANDBOX_GOLDEN_AUTO_BUILD": "0",
        "SANDBOX_RATE_USER": "100000/min",
        "SANDBOX_RATE_ANON": "100000/min",
        "SANDBOX_RATE_EXEC": "100000/min",
        "SANDBOX_RATE_UPLOAD": "100000/min",
        "SANDBOX_RATE_CREATE": "1000/min",
        "LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
    }
    _manage(env, "migrate", "--noinput", "-v", "0")
    _manage(env, "build_image", timeout=1800)
    seeded = _manage(env, "shell", "-c", _SEED, timeout=120)
    stack = MultiHostStack(
        url="",
        web_urls={"web1": f"http://127.0.0.1:{_free_port()}", "web2": f"http://127.0.0.1:{_free_port()}"},
        env=env,
        work_dir=work_dir,
        log_dir=log_dir,
        tokens=json.loads(seeded.stdout.split("TOKENS=", 1)[1]),
        haproxy_port=_free_port(),
    )
    stack.url = f"http://127.0.0.1:{stack.haproxy_port}"
    try:
        for index, name in enumerate(hosts, start=1):
            _host_prepare(stack, name, index)
        for name in hosts:
            stack.start("hostd", name)
            stack.start("worker", name)
        for name in ("web1", "web2", "beat", "haproxy"):
            stack.start(name)
        for name in hosts:
            stack.wait_hostd(name)
        for name in ("web1", "web2"):
            wait_ok(stack.web_urls[name] + "/healthz")
        wait_ok(stack.url + "/healthz")
        stack.wait_hosts_up(list(hosts))
    except BaseException:
        multihost_stop(stack)
        raise
    return stack


def multihost_stop(stack: MultiHostStack) -> None:
    """Everything the stack started goes: control processes, each host's processes, its VMMs
    (by runtime directory), their cgroups, the namespaces (with bridges, TAPs, tables) and the
    work directory."""
    try:
        for name in list(stack.procs):
            stack.kill(name)
        for node in stack.hosts.values():
            for name in list(node.procs):
                stack.kill(name, node.name)
            _kill_vmms(node.runtime_dir)
        for node in stack.hosts.values():
            for vm_dir in node.runtime_dir.iterdir() if node.runtime_dir.is_dir() else []:
                if vm_dir.is_dir():
                    with contextlib.suppress(OSError):
                        vmm_cgroup_remove(node.cgroup, cgroup_name(vm_dir.name, vm_dir))
            for parent in vmm_cgroup_dirs(node.cgroup, ""):  # the host's own parent cgroup
                with contextlib.suppress(OSError):
                    parent.rmdir()
    finally:
        for node in stack.hosts.values():
            _netns_remove(node.netns)
        shutil.rmtree(stack.work_dir, ignore_errors=True)
