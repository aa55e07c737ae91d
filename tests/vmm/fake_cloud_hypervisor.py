#!/usr/bin/env python3
"""A fake ``cloud-hypervisor`` for tests: same command line, same REST API, no guest.

Run as ``python tests/vmm/fake_cloud_hypervisor.py --api-socket path=<sock> [CH flags]``
(or through ``tests/vmm/bin/cloud-hypervisor``). Unknown CH flags are accepted and ignored.

What it checks, so the driver cannot drift from the real binary:
- every request is matched against the OpenAPI file (paths, methods, request bodies validated
  with jsonschema against the resolved component schemas). Deliberately STRICTER than the
  real binary: object schemas reject unknown properties (real CH silently ignores them, which
  would hide typos), and OpenAPI integer formats (uint8, int16...) are range-checked.
  Failures answer 400 (404 unknown endpoint) with a CH-style JSON error chain.
- CH's state rules: create only without a VM; boot needs Created; pause needs Running; resume
  needs Paused; snapshot needs Paused; restore needs an empty VMM; the power button is refused
  before boot and, pressed on a paused VM, is seen only after resume; resize within max vCPUs
  and the memory hotplug size, memory grown in multiples of 128 MiB with at most 8 hot-adds,
  a shrink silently ignored (ACPI). Wrong-state calls answer 500 with an error chain worded
  like the real one ("VM is not running", "InvalidStateTransition(Running, Running)", ...).
- Stale serial/vsock socket files make boot/restore fail with "Address already in use"; the
  fake leaves its socket files behind when the process exits or the guest powers off.
- A TAP is opened by one VMM at a time (flock'ed files in FAKE_CH_TAP_DIR): a restored clone
  that kept the original's TAP fails like the real binary.
- Without ``--no-shutdown`` a guest power-off exits the VMM; with it the VM goes to
  ``Shutdown`` and the VMM stays.

What it simulates: the serial port socket (banner, echo; the lines ``poweroff``, ``reboot``
and ``panic`` act as typed into the guest; ``panic`` emits the pvpanic event and reboots when
the cmdline has ``panic=N``), the hybrid vsock socket (``CONNECT 1024\\n`` -> ``OK 1024\\n``,
then the REAL guest agent's request handler, protocol v2, run in this process), the event
monitor file, counters, snapshot files (config.json, state.json, memory-ranges).

Knobs (environment): FAKE_CH_OPENAPI (spec path), FAKE_CH_POWEROFF_DELAY (seconds between
power button and guest power-off, default 0.2), FAKE_CH_IGNORE_POWER_BUTTON=1 (guest ignores
ACPI), FAKE_CH_STRICT=0 (allow unknown properties like the real binary), FAKE_CH_TAP_DIR.

The guest agent's exec requests run on THIS host, as the fake's user: tests send harmless ones.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import http.server
import importlib.util
import json
import os
import queue
import socket
import socketserver
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import yaml

VERSION = "v54.0-fake"
AGENT_PORT = 1024
MAX_BODY = 1024 * 1024

_HERE = Path(__file__).resolve().parent
_SPEC_CANDIDATES = [
    _HERE / "cloud-hypervisor-openapi.yaml",
    _HERE.parents[1] / "docs" / "reference" / "cloud-hypervisor-openapi.yaml",
    Path("/work/shared/reference/cloud-hypervisor-openapi.yaml"),
]


class ApiError(Exception):
    """An error answer: HTTP status + CH error chain."""

    def __init__(self, status: int, *chain: str) -> None:
        super().__init__(chain[-1] if chain else str(status))
        self.status = status
        self.chain = ["Error from API", *chain]


# ------------------------------------------------------------------------------------------
# OpenAPI loading and validation
# ------------------------------------------------------------------------------------------

_INT_FORMATS = {
    "int8": (-(2**7), 2**7 - 1),
    "int16": (-(2**15), 2**15 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint8": (0, 2**8 - 1),
    "uint16": (0, 2**16 - 1),
    "uint32": (0, 2**32 - 1),
}


def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker()
    for name, (low, high) in _INT_FORMATS.items():

        def check(instance: object, low: int = low, high: int = high) -> bool:
            if isinstance(instance, bool) or not isinstance(instance, int):
                return True  # the "type" keyword reports those
            return low <= instance <= high

        checker.checks(name)(check)
    return checker


def _strictify(node: Any) -> None:
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            _strictify(value)
    elif isinstance(node, list):
        for value in node:
            _strictify(value)


class OpenApi:
    """Routes and request/response validators built from the OpenAPI file."""

    def __init__(self, path: Path, *, strict: bool = True) -> None:
        doc = yaml.safe_load(path.read_text())
        self.components = copy.deepcopy(doc["components"])
        if strict:
            _strictify(self.components)
        self.checker = _format_checker()
        # endpoint -> method -> (schema name or None, body required)
        self.routes: dict[str, dict[str, tuple[str | None, bool]]] = {}
        for raw_path, ops in doc["paths"].items():
            endpoint = raw_path.lstrip("/")
            self.routes[endpoint] = {}
            for method, op in ops.items():
                body = op.get("requestBody") or {}
                ref = (((body.get("content") or {}).get("application/json") or {}).get("schema") or {}).get("$ref")
                name = ref.rsplit("/", 1)[-1] if ref else None
                self.routes[endpoint][method.upper()] = (name, bool(body.get("required")))

    def errors(self, schema_name: str, instance: object) -> list[str]:
        """Validation errors of ``instance`` against ``#/components/schemas/<schema_name>``."""
        root = {"$ref": f"#/components/schemas/{schema_name}", "components": self.components}
        validator = jsonschema.Draft4Validator(root, format_checker=self.checker)
        out = []
        for err in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path)):
            where = "/".join(str(p) for p in err.absolute_path) or "<body>"
            out.append(f"{where}: {err.message}")
        return out


def _find_spec() -> Path:
    env = os.environ.get("FAKE_CH_OPENAPI")
    if env:
        return Path(env)
    for candidate in _SPEC_CANDIDATES:
        if candidate.exists():
            return candidate
    raise SystemExit("fake cloud-hypervisor: OpenAPI file not found; set FAKE_CH_OPENAPI")


# ------------------------------------------------------------------------------------------
# Event monitor
# ------------------------------------------------------------------------------------------


class EventMonitor:
    def __init__(self, path: str | None) -> None:
        self.start = time.monotonic()
        self.lock = threading.Lock()
        self.fh = open(path, "w") if path else None  # noqa: SIM115 - lives as long as the process

    def emit(self, source: str, event: str, properties: dict[str, str] | None = None) -> None:
        if self.fh is None:
            return
        elapsed = time.monotonic() - self.start
        record = {
            "timestamp": {"secs": int(elapsed), "nanos": int((elapsed % 1) * 1e9)},
            "source": source,
            "event": event,
            "properties": properties,
        }
        with self.lock:
            self.fh.write(json.dumps(record, indent=2) + "\n\n")
            self.fh.flush()


# ------------------------------------------------------------------------------------------
# The simulated VM and its sockets
# ------------------------------------------------------------------------------------------


def _listen(path: str) -> socket.socket:
    if os.path.exists(path):
        raise OSError(98, "Address already in use")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(16)
    return sock


def _load_guest_agent() -> Any:
    """The real guest agent module (guest_agents/linux/sandbox_agent.py, stdlib only)."""
    path = _HERE.parents[1] / "guest_agents" / "linux" / "sandbox_agent.py"
    spec = importlib.util.spec_from_file_location("fake_ch_sandbox_agent", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class GuestAgent:
    """The real guest agent's request handler (``Agent``: protocol v2, exec, files) running
    in this process on its own thread, as if it ran in the guest. Each accepted hybrid-vsock
    connection becomes one agent stream (a socketpair), like an AF_VSOCK accept in the
    guest. Its commands run on this host: tests must only run harmless ones."""

    def __init__(self, boot_id: str) -> None:
        module = _load_guest_agent()
        self.agent = module.Agent(cgroup_root=None, reap_interval=0.05)
        self.agent.boot_id = boot_id
        self.max_connections = int(module.MAX_VSOCK_CONNECTIONS)
        self._queue: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # The agent's loop is single-threaded: new streams are handed over through a queue
        # and adopted on the loop's own thread.
        self.agent.loop.set_reader(self._wake_r, self._adopt)
        threading.Thread(target=self._run, name="guest-agent", daemon=True).start()

    def _run(self) -> None:
        while True:
            self.agent.loop.run_once()

    def _adopt(self) -> None:
        with contextlib.suppress(OSError):
            os.read(self._wake_r, 4096)
        while True:
            try:
                sock = self._queue.get_nowait()
            except queue.Empty:
                return
            if sum(1 for c in self.agent.conns if c.kind == "vsock") >= self.max_connections:
                sock.close()  # the real agent refuses connections beyond its bound
                continue
            self.agent.add_stream(sock)

    def set_boot_id(self, boot_id: str) -> None:
        self.agent.boot_id = boot_id

    def connect(self) -> socket.socket:
        """A new guest-side connection to the agent's port; returns the host end."""
        host, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._queue.put(guest)
        os.write(self._wake_w, b"x")
        return host


class FakeVmm:
    """The VMM state machine. ``state`` is None (no VM), Created, Running, Paused or Shutdown."""

    def __init__(self, events: EventMonitor, *, no_shutdown: bool, exit_event: threading.Event) -> None:
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.events = events
        self.no_shutdown = no_shutdown
        self.exit_event = exit_event
        self.state: str | None = None
        self.config: dict[str, Any] | None = None
        self.boot_id = ""
        self.booted_at = 0.0
        self.listeners: list[socket.socket] = []
        self.conns: list[socket.socket] = []
        self.socket_files: list[str] = []
        self.next_bdf = 6
        self.agent: GuestAgent | None = None
        self.pending_power_button = False
        self.hotplug_slots = 0  # ACPI memory hot-adds since the VM was created (CH has 8)
        self.tap_locks: list[int] = []

    # -- sockets ----------------------------------------------------------------------------

    def _open_sockets(self, chain_head: str) -> None:
        assert self.config is not None
        wanted: list[tuple[str, Any]] = []
        serial = self.config.get("serial") or {}
        if serial.get("mode") == "Socket":
            if not serial.get("socket"):
                raise ApiError(500, chain_head, "Serial socket path missing")
            wanted.append((serial["socket"], self._serve_serial))
        vsock = self.config.get("vsock")
        if vsock:
            wanted.append((vsock["socket"], self._serve_vsock))
        opened: list[tuple[socket.socket, str]] = []
        try:
            for path, handler in wanted:
                try:
                    sock = _listen(path)
                except OSError as exc:
                    raise ApiError(500, chain_head, f"Error binding socket {path}", f"{exc}") from exc
                opened.append((sock, path))
                threading.Thread(target=self._accept_loop, args=(sock, handler), daemon=True).start()
        except ApiError:
            for sock, path in opened:
                sock.close()
                os.unlink(path)
            raise
        for sock, path in opened:
            self.listeners.append(sock)
            self.socket_files.append(path)

    def _close_sockets(self, *, remove_files: bool) -> None:
        for sock in self.listeners + self.conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.listeners, self.conns = [], []
        if remove_files:
            for path in self.socket_files:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        self.socket_files = []

    def _accept_loop(self, listener: socket.socket, handler: Any) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with self.lock:
                self.conns.append(conn)
            threading.Thread(target=self._run_conn, args=(conn, handler), daemon=True).start()

    def _run_conn(self, conn: socket.socket, handler: Any) -> None:
        try:
            handler(conn)
        except OSError:
            pass
        finally:
            with self.lock:
                if conn in self.conns:
                    self.conns.remove(conn)
            conn.close()

    def _serve_serial(self, conn: socket.socket) -> None:
        """A guest shell on the serial port: echoes input; the lines ``poweroff``, ``reboot``
        and ``panic`` make the fake guest do that (like typing them into the real guest)."""
        conn.sendall(b"fake guest: serial console\r\nlogin: ")
        line = b""
        while True:
            data = conn.recv(4096)
            if not data:
                return
            conn.sendall(data)
            line = (line + data)[-256:]
            while b"\n" in line:
                command, line = line.split(b"\n", 1)
                self._guest_command(command.strip().decode(errors="replace"))

    def _guest_command(self, command: str) -> None:
        if command == "poweroff":
            threading.Thread(target=self._guest_poweroff, daemon=True).start()
        elif command == "reboot":
            with self.lock:
                if self.state == "Running":
                    self._reboot_guest()
        elif command == "panic":
            with self.lock:
                if self.state != "Running":
                    return
                if (self.config or {}).get("pvpanic"):
                    self.events.emit("guest", "panic", {"event": "panic"})
                cmdline = ((self.config or {}).get("payload") or {}).get("cmdline") or ""
                # Linux reboots after a panic when booted with panic=<n> (n != 0); else it hangs.
                if any(arg.startswith("panic=") and arg != "panic=0" for arg in cmdline.split()):
                    self._reboot_guest()

    def _serve_vsock(self, conn: socket.socket) -> None:
        line = b""
        while not line.endswith(b"\n"):
            chunk = conn.recv(1)
            if not chunk or len(line) > 64:
                return
            line += chunk
        parts = line.decode(errors="replace").split()
        if len(parts) != 2 or parts[0] != "CONNECT" or parts[1] != str(AGENT_PORT):
            return  # nobody listens on that guest port: the real VMM closes the connection
        with self.cond:
            # A paused guest accepts nothing until it is resumed.
            self.cond.wait_for(lambda: self.state != "Paused")
            if self.state != "Running" or self.agent is None:
                return
            guest = self.agent.connect()
        try:
            conn.sendall(f"OK {AGENT_PORT}\n".encode())
            back = threading.Thread(target=self._relay, args=(guest, conn), daemon=True)
            back.start()
            self._relay(conn, guest)
            back.join(5)
        finally:
            guest.close()

    def _relay(self, src: socket.socket, dst: socket.socket) -> None:
        """Copy bytes one way while the guest runs (a paused guest moves nothing)."""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self.cond:
                    self.cond.wait_for(lambda: self.state != "Paused")
                    if self.state != "Running":
                        break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # -- state helpers ----------------------------------------------------------------------

    def _set_state(self, state: str | None) -> None:
        self.state = state
        self.cond.notify_all()

    def _need_vm(self, chain_head: str) -> dict[str, Any]:
        if self.config is None:
            raise ApiError(404, chain_head, "VM is not created")
        return self.config

    def _check_files(self, chain_head: str) -> None:
        assert self.config is not None
        payload = self.config.get("payload") or {}
        image = payload.get("kernel") or payload.get("firmware") or payload.get("igvm")
        if not image:
            raise ApiError(500, chain_head, "Error loading kernel", "No kernel or firmware in payload")
        for key in ("kernel", "firmware", "initramfs"):
            if payload.get(key) and not os.path.exists(payload[key]):
                raise ApiError(500, chain_head, f"Cannot open {key} {payload[key]}", "No such file or directory")
        for disk in self.config.get("disks") or []:
            if disk.get("path") and not os.path.exists(disk["path"]):
                raise ApiError(500, chain_head, f"Failed to open disk {disk['path']}", "No such file or directory")

    def _start_guest(self, chain_head: str) -> None:
        self._check_files(chain_head)
        self._open_taps(chain_head)
        try:
            self._open_sockets(chain_head)
        except ApiError:
            self._close_taps()
            raise
        self.boot_id = str(uuid.uuid4())
        self.booted_at = time.monotonic()
        self.pending_power_button = False
        if self.config and self.config.get("vsock"):
            if self.agent is None:
                self.agent = GuestAgent(self.boot_id)
            self.agent.set_boot_id(self.boot_id)

    def _open_taps(self, chain_head: str) -> None:
        """Like TUNSETIFF on a TAP another VMM holds (EBUSY): two fakes never share a TAP.
        Host-wide through flock'ed files in FAKE_CH_TAP_DIR (default /tmp/fake-ch-taps)."""
        assert self.config is not None
        tap_dir = Path(os.environ.get("FAKE_CH_TAP_DIR", "/tmp/fake-ch-taps"))
        tap_dir.mkdir(parents=True, exist_ok=True)
        for net in self.config.get("net") or []:
            tap = net.get("tap")
            if not tap:
                continue
            fd = os.open(tap_dir / tap, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                self._close_taps()
                raise ApiError(
                    500, chain_head, f"Error creating TAP device {tap}", "Device or resource busy (os error 16)"
                ) from exc
            self.tap_locks.append(fd)

    def _close_taps(self) -> None:
        for fd in self.tap_locks:
            os.close(fd)
        self.tap_locks = []

    def _reboot_guest(self) -> None:
        self.events.emit("vm", "rebooting")
        for conn in self.conns:  # the guest agent restarts with the guest
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.boot_id = str(uuid.uuid4())
        self.booted_at = time.monotonic()
        if self.agent is not None:
            self.agent.set_boot_id(self.boot_id)
        self.events.emit("vm", "rebooted")

    def _memory_total(self) -> int:
        assert self.config is not None
        memory = self.config.get("memory") or {"size": 512 * 1024 * 1024}
        return int(memory["size"]) + int(memory.get("hotplugged_size") or 0)

    def _device_ids(self) -> list[str]:
        assert self.config is not None
        ids = []
        for key in ("disks", "net", "fs", "pmem", "devices", "vdpa"):
            ids += [d.get("id") for d in self.config.get(key) or [] if d.get("id")]
        vsock = self.config.get("vsock")
        if vsock and vsock.get("id"):
            ids.append(vsock["id"])
        return ids

    def _guest_poweroff(self) -> None:
        with self.lock:
            if self.state != "Running":
                return
            # The VM's socket files stay behind (with or without --no-shutdown): booting again
            # in this VMM fails with "Address already in use" unless the manager removes them.
            self._close_sockets(remove_files=False)
            self._close_taps()
            self._set_state("Shutdown")
            self.events.emit("vm", "shutdown")
        if not self.no_shutdown:
            # Default CH behaviour: the VMM exits when the guest powers off.
            self.exit_event.set()

    # -- endpoints --------------------------------------------------------------------------

    def handle(self, method: str, endpoint: str, body: Any) -> tuple[int, Any]:
        with self.lock:
            handler = getattr(self, "ep_" + endpoint.replace(".", "_").replace("-", "_"), None)
            if handler is None:
                raise ApiError(500, f"{endpoint} is not implemented by the fake VMM")
            result: tuple[int, Any] = handler(body)
            return result

    def ep_vmm_ping(self, body: Any) -> tuple[int, Any]:
        return 200, {"build_version": VERSION, "version": VERSION, "pid": os.getpid(), "features": ["kvm"]}

    def ep_vmm_shutdown(self, body: Any) -> tuple[int, Any]:
        self.exit_event.set()
        return 200, None

    def ep_vm_create(self, body: Any) -> tuple[int, Any]:
        head = "The VM could not be created"
        if self.config is not None:
            raise ApiError(500, head, "VM is already created")
        cpus = body.get("cpus") or {"boot_vcpus": 1, "max_vcpus": 1}
        if cpus["boot_vcpus"] > cpus["max_vcpus"]:
            raise ApiError(400, head, "Max vCPUs lower than boot vCPUs")
        config = copy.deepcopy(body)
        config.setdefault("cpus", cpus)
        config.setdefault("memory", {"size": 512 * 1024 * 1024})
        if config.get("vsock") and int(config["vsock"]["cid"]) < 3:
            raise ApiError(400, head, "Invalid vsock CID")
        self.config = config
        self.hotplug_slots = 0
        self._set_state("Created")
        return 204, None

    def ep_vm_delete(self, body: Any) -> tuple[int, Any]:
        if self.config is None:
            return 204, None
        self._close_sockets(remove_files=True)
        self._close_taps()
        self.config = None
        self._set_state(None)
        self.events.emit("vm", "deleted")
        return 204, None

    def ep_vm_boot(self, body: Any) -> tuple[int, Any]:
        head = "The VM could not boot"
        self._need_vm(head)
        if self.state not in ("Created", "Shutdown"):
            # Debug-formatted like older releases of the real binary.
            raise ApiError(500, head, f"InvalidStateTransition({self.state}, Running)")
        self.events.emit("vm", "booting")
        self._start_guest(head)
        self._set_state("Running")
        self.events.emit("vm", "booted")
        return 204, None

    def ep_vm_info(self, body: Any) -> tuple[int, Any]:
        config = self._need_vm("The VM information could not be retrieved")
        info = {
            "config": config,
            "state": self.state,
            "memory_actual_size": self._memory_total(),
            "device_tree": {
                dev_id: {"id": dev_id, "resources": [], "children": [], "pci_bdf": "0000:00:05.0"}
                for dev_id in self._device_ids()
            },
        }
        return 200, ("VmInfo", info)

    def ep_vm_counters(self, body: Any) -> tuple[int, Any]:
        head = "The VM counters could not be retrieved"
        config = self._need_vm(head)
        if self.state not in ("Running", "Paused"):
            raise ApiError(500, head, "VM is not running")
        tick = int((time.monotonic() - self.booted_at) * 1000)
        counters: dict[str, dict[str, int]] = {}
        for disk in config.get("disks") or []:
            counters[disk.get("id") or "_disk0"] = {
                "read_bytes": 4096 * tick, "write_bytes": 512 * tick, "read_ops": tick, "write_ops": tick // 8,
            }  # fmt: skip
        for net in config.get("net") or []:
            counters[net.get("id") or "_net0"] = {
                "rx_bytes": 100 * tick, "rx_frames": tick, "tx_bytes": 80 * tick, "tx_frames": tick,
            }  # fmt: skip
        return 200, ("VmCounters", counters)

    def _simple_transition(self, head: str, need: str, new: str, before: str, after: str) -> tuple[int, Any]:
        self._need_vm(head)
        if self.state in ("Created", "Shutdown"):
            raise ApiError(500, head, "VM is not running")  # no booted VM object
        if self.state != need:
            raise ApiError(500, head, f"InvalidStateTransition({self.state}, {new})")
        self.events.emit("vm", before)
        self._set_state(new)
        self.events.emit("vm", after)
        return 204, None

    def ep_vm_pause(self, body: Any) -> tuple[int, Any]:
        return self._simple_transition("The VM could not be paused", "Running", "Paused", "pausing", "paused")

    def ep_vm_resume(self, body: Any) -> tuple[int, Any]:
        result = self._simple_transition("The VM could not be resumed", "Paused", "Running", "resuming", "resumed")
        if self.pending_power_button:
            # An ACPI button pressed while the vCPUs were stopped is seen now.
            self.pending_power_button = False
            self._schedule_poweroff()
        return result

    def ep_vm_reboot(self, body: Any) -> tuple[int, Any]:
        head = "The VM could not reboot"
        self._need_vm(head)
        if self.state != "Running":
            raise ApiError(500, head, "VM is not running")
        self._reboot_guest()
        return 204, None

    def ep_vm_power_button(self, body: Any) -> tuple[int, Any]:
        head = "The VM could not be powered off"
        self._need_vm(head)
        if self.state not in ("Running", "Paused"):
            raise ApiError(500, head, "VM is not running")  # not booted: refused
        self.events.emit("vm", "power-button")
        if self.state == "Paused":
            # Accepted like the real binary, but stopped vCPUs see nothing until resumed.
            self.pending_power_button = True
        else:
            self._schedule_poweroff()
        return 204, None

    def _schedule_poweroff(self) -> None:
        if os.environ.get("FAKE_CH_IGNORE_POWER_BUTTON") != "1":
            delay = float(os.environ.get("FAKE_CH_POWEROFF_DELAY", "0.2"))
            threading.Timer(delay, self._guest_poweroff).start()

    def ep_vm_shutdown(self, body: Any) -> tuple[int, Any]:
        head = "The VM could not shut down"
        self._need_vm(head)
        if self.state not in ("Running", "Paused"):
            raise ApiError(500, head, "VM is not running")
        self.events.emit("vm", "shutdown")
        self._close_sockets(remove_files=True)
        self._close_taps()
        # The real binary drops the VM object and keeps the config: info says Created.
        self._set_state("Created")
        return 204, None

    def ep_vm_resize(self, body: Any) -> tuple[int, Any]:
        head = "The VM could not be resized"
        config = self._need_vm(head)
        if self.state not in ("Created", "Running"):
            raise ApiError(500, head, "VM is not running")
        cpus, memory = config["cpus"], config["memory"]
        vcpus = body.get("desired_vcpus")
        ram = body.get("desired_ram")
        if vcpus is not None and vcpus > cpus["max_vcpus"]:
            raise ApiError(
                500, head, "Error resizing VM", f"Desired vCPUs {vcpus} exceed the maximum {cpus['max_vcpus']}"
            )
        grow = 0
        if ram is not None:
            limit = memory["size"] + int(memory.get("hotplug_size") or 0)
            if ram > limit:
                raise ApiError(500, head, "Error resizing VM", f"Desired RAM {ram} exceeds the hotplug limit {limit}")
            if ram <= self._memory_total():
                ram = None  # ACPI hotplug: the real binary silently ignores a shrink
            elif self.state == "Running":
                grow = ram - self._memory_total()
                # memory_manager.rs hotplug_ram_region: 8 slots, DIMMs of a multiple of 128 MiB.
                if self.hotplug_slots >= 8:
                    raise ApiError(500, head, "Error resizing VM", "Memory manager error: NoSlotAvailable")
                if grow % (128 << 20):
                    raise ApiError(500, head, "Error resizing VM", "Memory manager error: InvalidSize")
        if "desired_balloon" in body and not config.get("balloon"):
            raise ApiError(500, head, "Error resizing VM", "No balloon device")
        self.events.emit("vm", "resizing")
        if vcpus is not None:
            cpus["boot_vcpus"] = vcpus
        if ram is not None:
            memory["hotplugged_size"] = ram - memory["size"]
            if grow:
                self.hotplug_slots += 1
        self.events.emit("vm", "resized")
        return 204, None

    def _add_device(self, body: Any, kind: str, prefix: str) -> tuple[int, Any]:
        head = f"The {prefix} device could not be added to the VM"
        config = self._need_vm(head)
        dev_id = body.get("id") or f"_{prefix}{len(self._device_ids())}"
        if dev_id in self._device_ids():
            raise ApiError(409, head, f"Device id {dev_id} already exists")
        device = dict(body, id=dev_id)
        if kind == "vsock":
            if config.get("vsock"):
                raise ApiError(500, head, "Only one vsock device is supported")
            if self.state in ("Running", "Paused"):
                try:
                    sock = _listen(device["socket"])
                except OSError as exc:
                    raise ApiError(500, head, f"{exc}") from exc
                self.listeners.append(sock)
                self.socket_files.append(device["socket"])
                threading.Thread(target=self._accept_loop, args=(sock, self._serve_vsock), daemon=True).start()
            config["vsock"] = device
        else:
            config.setdefault(kind, []).append(device)
        if self.state in ("Running", "Paused"):
            self.next_bdf += 1
            return 200, ("PciDeviceInfo", {"id": dev_id, "bdf": f"0000:00:{self.next_bdf:02x}.0"})
        return 204, None

    def ep_vm_add_disk(self, body: Any) -> tuple[int, Any]:
        if body.get("path") and not os.path.exists(body["path"]):
            raise ApiError(500, "The disk could not be added to the VM", "No such file or directory")
        return self._add_device(body, "disks", "disk")

    def ep_vm_add_net(self, body: Any) -> tuple[int, Any]:
        return self._add_device(body, "net", "net")

    def ep_vm_add_vsock(self, body: Any) -> tuple[int, Any]:
        return self._add_device(body, "vsock", "vsock")

    def ep_vm_remove_device(self, body: Any) -> tuple[int, Any]:
        head = "The device could not be removed from the VM"
        config = self._need_vm(head)
        dev_id = body.get("id")
        if dev_id not in self._device_ids():
            raise ApiError(404, head, f"Unknown device id {dev_id}")
        for key in ("disks", "net", "fs", "pmem", "devices", "vdpa"):
            if config.get(key):
                config[key] = [d for d in config[key] if d.get("id") != dev_id]
        if (config.get("vsock") or {}).get("id") == dev_id:
            config.pop("vsock")
        return 204, None

    @staticmethod
    def _url_dir(url: str, head: str) -> Path:
        # Like the real binary: strip the prefix, no percent-decoding.
        if not url.startswith("file://"):
            raise ApiError(500, head, f"Unsupported URL {url!r}: only file:// is supported")
        path = Path(url[len("file://") :])
        if not path.is_dir():
            raise ApiError(500, head, f"{path} is not a directory", "No such file or directory")
        return path

    def ep_vm_snapshot(self, body: Any) -> tuple[int, Any]:
        head = "The VM could not be snapshotted"
        config = self._need_vm(head)
        if self.state != "Paused":
            raise ApiError(500, head, "VM is not paused")
        dest = self._url_dir(body.get("destination_url") or "", head)
        self.events.emit("vm", "snapshotting")
        (dest / "config.json").write_text(json.dumps(config, indent=2))
        state = {
            "fake": True,
            "boot_id": self.boot_id,
            "uptime_s": time.monotonic() - self.booted_at,
            "hotplug_slots": self.hotplug_slots,
        }
        (dest / "state.json").write_text(json.dumps(state))
        (dest / "memory-ranges").write_bytes(b"\0" * 4096)
        self.events.emit("vm", "snapshotted")
        return 204, None

    def restore_from(self, body: dict[str, Any], api: OpenApi) -> None:
        head = "The VM could not be restored"
        if self.state in ("Running", "Paused"):
            raise ApiError(500, head, "Cannot restore a VM while VM is running")
        if self.config is not None:
            raise ApiError(500, head, "VM is already created")
        src = self._url_dir(body.get("source_url") or "", head)
        for name in ("config.json", "state.json", "memory-ranges"):
            if not (src / name).exists():
                raise ApiError(500, head, f"Missing {name} in {src}", "No such file or directory")
        try:
            config = json.loads((src / "config.json").read_text())
            state = json.loads((src / "state.json").read_text())
        except ValueError as exc:
            raise ApiError(500, head, "Error parsing snapshot", str(exc)) from exc
        errors = api.errors("VmConfig", config)
        if errors:
            raise ApiError(400, head, "Invalid config.json in snapshot", *errors)
        self.events.emit("vm", "restoring")
        self.config = config
        try:
            self._start_guest(head)
        except ApiError:
            self.config = None
            raise
        self.boot_id = state.get("boot_id") or self.boot_id
        self.hotplug_slots = int(state.get("hotplug_slots") or 0)
        if self.agent is not None:
            self.agent.set_boot_id(self.boot_id)
        self._set_state("Paused")
        self.events.emit("vm", "restored")
        if body.get("resume"):
            self._set_state("Running")
            self.events.emit("vm", "resumed")

    # Restore is dispatched by the HTTP handler (it needs the validator).

    # -- live migration ---------------------------------------------------------------------
    # Between two fakes over TCP (the real wire format is CH's own binary protocol; the fake
    # speaks length-prefixed JSON with the same steps: Start, Config, Memory, State, Complete,
    # or Abandon). Like the real binary, both calls hold the VMM (its API answers nothing else)
    # until the migration ends; the receiver recreates the VM from the sender's config (same
    # socket, disk and TAP paths) and resumes it; the sender's VMM exits after a success and
    # resumes its VM after a failure.

    def receive_migration(self, body: dict[str, Any], api: OpenApi) -> None:
        head = "The VM migration could not be received"
        if self.config is not None:
            raise ApiError(500, head, "VM is already created")
        if body.get("tls_dir"):
            raise ApiError(500, head, "TLS is not supported by the fake VMM")
        if (body.get("memory_mode") or "Precopy") != "Precopy":
            raise ApiError(500, head, "Postcopy is not supported by the fake VMM")
        family, address = _migration_address(body["receiver_url"], head)
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(address)
            listener.listen(1)
        except OSError as exc:
            listener.close()
            raise ApiError(500, head, f"Error binding to socket {body['receiver_url']}", f"{exc}") from exc
        try:
            conn, _ = listener.accept()  # like the real binary: waits for the sender, unbounded
        finally:
            listener.close()
        config: dict[str, Any] | None = None
        state: dict[str, Any] = {}
        with conn:
            conn.settimeout(MIGRATION_IO_TIMEOUT)
            try:
                while True:
                    message = _recv_message(conn)
                    command = message.get("command")
                    if command == "start":
                        pass
                    elif command == "config":
                        config = message.get("config")
                        errors = api.errors("VmConfig", config)
                        if errors:
                            _send_message(conn, {"status": "error", "error": "invalid config"})
                            raise ApiError(500, head, "Invalid VM config received", *errors)
                    elif command == "memory":
                        if config is None:
                            raise ApiError(500, head, "Memory received before the config")
                    elif command == "state":
                        state = dict(message.get("state") or {})
                    elif command == "abandon":
                        raise ApiError(500, head, "Migration abandoned by the source")
                    elif command == "complete":
                        if config is None:
                            raise ApiError(500, head, "Migration completed without a config")
                        self.config = config
                        try:
                            self._start_guest(head)  # sockets and TAPs at the sender's paths
                        except ApiError as exc:
                            self.config = None
                            _send_message(conn, {"status": "error", "error": exc.chain[-1]})
                            raise
                        self.boot_id = str(state.get("boot_id") or self.boot_id)
                        self.hotplug_slots = int(state.get("hotplug_slots") or 0)
                        if self.agent is not None:
                            self.agent.set_boot_id(self.boot_id)
                        self._set_state("Running")
                        self.events.emit("vm", "resumed")
                        _send_message(conn, {"status": "ok"})
                        return
                    else:
                        raise ApiError(500, head, f"Unknown migration command {command!r}")
                    _send_message(conn, {"status": "ok"})
            except OSError as exc:
                raise ApiError(500, head, "Migration connection failed", f"{exc}") from exc

    def send_migration(self, body: dict[str, Any]) -> None:
        head = "The VM could not be migrated"
        config = self._need_vm(head)
        if self.state != "Running":
            raise ApiError(500, head, "VM is not running")
        if body.get("local") or body.get("tls_dir") or (body.get("memory_mode") or "Precopy") != "Precopy":
            raise ApiError(500, head, "Only plain precopy migration is supported by the fake VMM")
        family, address = _migration_address(body["destination_url"], head)
        deadline = time.monotonic() + int(body.get("timeout_s") or 3600)
        try:
            conn = socket.create_connection(address, timeout=min(MIGRATION_IO_TIMEOUT, deadline - time.monotonic()))
        except OSError as exc:
            raise ApiError(500, head, f"Error connecting to {body['destination_url']}", f"{exc}") from exc
        paused = False
        try:
            with conn:
                conn.settimeout(max(0.1, min(MIGRATION_IO_TIMEOUT, deadline - time.monotonic())))
                self._migration_step(conn, {"command": "start"}, head)
                self._migration_step(conn, {"command": "config", "config": config}, head)
                self._migration_step(conn, {"command": "memory", "bytes": self._memory_total()}, head)
                self.events.emit("vm", "pausing")
                self._set_state("Paused")
                paused = True
                self.events.emit("vm", "paused")
                state = {"boot_id": self.boot_id, "hotplug_slots": self.hotplug_slots}
                self._migration_step(conn, {"command": "state", "state": state}, head)
                self._migration_step(conn, {"command": "complete"}, head)
        except (ApiError, OSError) as exc:
            if paused:  # the real binary resumes the VM on the source after a failure
                self._set_state("Running")
                self.events.emit("vm", "resumed")
            if isinstance(exc, ApiError):
                raise
            raise ApiError(500, head, "Migration connection failed", f"{exc}") from exc
        # Sent: the VM lives on the target; this VMM shuts down (sockets stay behind).
        self._close_sockets(remove_files=False)
        self._close_taps()
        self.events.emit("vm", "shutdown")
        self.exit_event.set()

    @staticmethod
    def _migration_step(conn: socket.socket, message: dict[str, Any], head: str) -> None:
        _send_message(conn, message)
        answer = _recv_message(conn)
        if answer.get("status") != "ok":
            raise ApiError(500, head, f"Migration refused by the destination: {answer.get('error', '?')}")


MIGRATION_IO_TIMEOUT = 30.0
MIGRATION_MAX_MESSAGE = 4 * 1024 * 1024


def _migration_address(url: str, head: str) -> tuple[socket.AddressFamily, Any]:
    """``tcp:<host>:<port>`` (IPv6 in brackets) or ``unix:<path>``, like the real binary."""
    if url.startswith("unix:"):
        return socket.AF_UNIX, url[len("unix:") :]
    if url.startswith("tcp:"):
        host, _, port = url[len("tcp:") :].rpartition(":")
        if host and port.isdigit():
            if host.startswith("[") and host.endswith("]"):
                return socket.AF_INET6, (host[1:-1], int(port))
            return socket.AF_INET, (host, int(port))
    raise ApiError(500, head, f"Invalid migration URL {url!r}")


def _send_message(conn: socket.socket, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode()
    conn.sendall(len(data).to_bytes(8, "big") + data)


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    out = b""
    while len(out) < size:
        chunk = conn.recv(size - len(out))
        if not chunk:
            raise ConnectionError("migration connection closed")
        out += chunk
    return out


def _recv_message(conn: socket.socket) -> dict[str, Any]:
    size = int.from_bytes(_recv_exact(conn, 8), "big")
    if size > MIGRATION_MAX_MESSAGE:
        raise ConnectionError("migration message too large")
    value = json.loads(_recv_exact(conn, size))
    if not isinstance(value, dict):
        raise ConnectionError("migration message is not an object")
    return value


# ------------------------------------------------------------------------------------------
# HTTP over the Unix socket
# ------------------------------------------------------------------------------------------


class UnixHttpServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def make_handler(vmm: FakeVmm, api: OpenApi, log: Any) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "cloud-hypervisor-fake"

        def address_string(self) -> str:
            return "unix"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            log.write(f"api: {format % args}\n")
            log.flush()

        def _send(self, status: int, body: Any) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            if data:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()

        def _dispatch(self, method: str) -> None:
            try:
                status, body = self._route(method)
            except ApiError as exc:
                status, body = exc.status, exc.chain
            except Exception as exc:  # a fake bug must still answer, and be visible in the log
                log.write(traceback.format_exc())
                status, body = 500, ["Error from API", "fake VMM internal error", repr(exc)]
            self._send(status, body)
            if status < 300 and self.path.endswith("/vmm.shutdown"):
                self.close_connection = True

        def _route(self, method: str) -> tuple[int, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                raise ApiError(413, "Request body too large")
            raw = self.rfile.read(length) if length else b""
            prefix = "/api/v1/"
            if not self.path.startswith(prefix):
                raise ApiError(404, f"Unknown path {self.path}")
            endpoint = self.path[len(prefix) :].split("?", 1)[0]
            route = api.routes.get(endpoint)
            if route is None:
                raise ApiError(404, f"Unknown endpoint {endpoint}")
            if method not in route:
                raise ApiError(400, f"Method {method} not allowed on {endpoint}")
            schema, required = route[method]
            body: Any = None
            if schema is not None:
                if not raw.strip():
                    if required:
                        raise ApiError(400, "Error parsing JSON", "Missing request body")
                else:
                    try:
                        body = json.loads(raw)
                    except ValueError as exc:
                        raise ApiError(400, "Error parsing JSON", str(exc)) from exc
                    errors = api.errors(schema, body)
                    if errors:
                        raise ApiError(400, f"Invalid {schema}", *errors)
            if endpoint == "vm.restore":
                with vmm.lock:
                    vmm.restore_from(body, api)
                return 204, None
            if endpoint == "vm.receive-migration":
                with vmm.lock:
                    vmm.receive_migration(body, api)
                return 204, None
            if endpoint == "vm.send-migration":
                with vmm.lock:
                    vmm.send_migration(body)
                return 204, None
            status, result = vmm.handle(method, endpoint, body)
            if isinstance(result, tuple):
                response_schema, result = result
                errors = api.errors(response_schema, result)
                if errors:  # the fake must not lie about the spec either
                    raise ApiError(500, f"fake produced an invalid {response_schema}", *errors)
            return status, result

        def do_GET(self) -> None:  # noqa: N802 - stdlib naming
            self._dispatch("GET")

        def do_PUT(self) -> None:  # noqa: N802
            self._dispatch("PUT")

        def do_POST(self) -> None:  # noqa: N802
            self._dispatch("POST")

        def do_DELETE(self) -> None:  # noqa: N802
            self._dispatch("DELETE")

        def do_PATCH(self) -> None:  # noqa: N802
            self._dispatch("PATCH")

    return Handler


def _kv(value: str | None, key: str) -> str | None:
    """Parse CH's ``key=value,key2=value2`` flag syntax."""
    if value is None:
        return None
    for part in value.split(","):
        k, _, v = part.partition("=")
        if k == key:
            return v
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cloud-hypervisor (fake)")
    parser.add_argument("--api-socket")
    parser.add_argument("--event-monitor")
    parser.add_argument("--log-file")
    parser.add_argument("--seccomp", default="true")
    parser.add_argument("--restore")
    parser.add_argument("--no-shutdown", action="store_true")
    parser.add_argument("-v", action="count", default=0)
    parser.add_argument("-V", "--version", action="store_true")
    args, _unknown = parser.parse_known_args(argv)
    if args.version:
        print(f"cloud-hypervisor {VERSION}")
        return 0

    api_path = _kv(args.api_socket, "path") if args.api_socket else None
    if not api_path:
        print("fake cloud-hypervisor: only --api-socket path=... is supported", file=sys.stderr)
        return 1
    log = open(args.log_file, "a") if args.log_file else sys.stderr  # noqa: SIM115
    api = OpenApi(_find_spec(), strict=os.environ.get("FAKE_CH_STRICT", "1") != "0")
    events = EventMonitor(_kv(args.event_monitor, "path"))
    exit_event = threading.Event()
    vmm = FakeVmm(events, no_shutdown=args.no_shutdown, exit_event=exit_event)
    events.emit("vmm", "starting")

    if os.path.exists(api_path):
        print(f"Error: API socket {api_path}: Address already in use (os error 98)", file=sys.stderr)
        return 1
    server = UnixHttpServer(api_path, make_handler(vmm, api, log))
    if args.restore:
        body: dict[str, Any] = {"source_url": _kv(args.restore, "source_url") or ""}
        body["resume"] = _kv(args.restore, "resume") == "true"
        try:
            with vmm.lock:
                vmm.restore_from(body, api)
        except ApiError as exc:
            print(f"Error restoring VM: {exc.chain}", file=sys.stderr)
            return 1
    log.write(f"fake cloud-hypervisor {VERSION} pid {os.getpid()} listening on {api_path}\n")
    log.flush()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    exit_event.wait()
    time.sleep(0.05)  # let the vmm.shutdown answer leave
    server.shutdown()
    with vmm.lock:
        if vmm.state in ("Running", "Paused"):
            events.emit("vm", "shutdown")
        # Like the real binary: socket files are left behind for the manager to remove.
        vmm._close_sockets(remove_files=False)
    events.emit("vmm", "shutdown")
    log.write("fake cloud-hypervisor exiting\n")
    log.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
