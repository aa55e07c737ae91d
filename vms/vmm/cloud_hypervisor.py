"""Cloud Hypervisor driver, layered like docker-py.

1. Transport: HTTP/1.1 over the VMM's Unix API socket (``httpx.HTTPTransport(uds=...)``),
   base URL ``http://localhost/api/v1``; every call has a timeout.
2. ``ChApiClient``: one method per REST endpoint the product uses.
3. Errors: ``_raise_for_response`` / ``_request`` are the ONE place where Cloud Hypervisor's
   status codes and JSON error chains (``["Error from API", "The VM could not be paused",
   "VM is not running"]``) become ``VmmStateError`` / ``VmmError`` / ``VmmTimeout`` /
   ``VmmNotRunning``; the chain is kept in ``details``.
4. ``CloudHypervisorDriver``: the ``Driver`` protocol of ``base.py``, plus ``snapshot`` and
   ``restore``.

Also here: an incremental, bounded reader of the ``--event-monitor`` file and a mapping from
events to ``RuntimeState``.

Nothing here imports Django. Everything the driver knows about a VM lives in its runtime
directory (see ``base.py``), so any process may call any method.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypedDict

import httpx

from vms.vmm.base import (
    LaunchResult,
    RuntimeState,
    VmmError,
    VmmNotRunning,
    VmmStateError,
    VmmTimeout,
    VmmUnsupported,
    VmRuntimeInfo,
    VmSpec,
)
from vms.vmm.process import call_in_netns

__all__ = [
    "API_BASE_URL",
    "ChApiClient",
    "ChEvent",
    "ChSnapshot",
    "CloudHypervisorDriver",
    "EventMonitorReader",
    "EventStreamParser",
    "build_vm_config",
    "cloud_hypervisor_available",
    "event_to_state",
    "kvm_usable",
]

API_BASE_URL = "http://localhost/api/v1"
DEFAULT_API_TIMEOUT = 5.0
MIB = 1024 * 1024

JsonObject = dict[str, Any]


# --------------------------------------------------------------------------------------------
# Errors: the one place where API answers become exceptions
# --------------------------------------------------------------------------------------------

# Wrong-state answers of the real binary are mostly 500 with a chain ending in one of these.
_STATE_ERROR_RE = re.compile(
    r"not (?:created|running|paused|booted|ready)"
    r"|already (?:created|running|paused|booted)"
    r"|config(?:uration)? (?:is )?missing|missing config"
    r"|invalid (?:vm )?state transition",
    re.IGNORECASE,
)


def _error_chain(response: httpx.Response) -> list[str]:
    """CH answers errors with a JSON array of strings (outermost first); be lenient."""
    text = response.text
    try:
        body = json.loads(text) if text else None
    except ValueError:
        return [text.strip()] if text.strip() else []
    if isinstance(body, list):
        return [str(item) for item in body]
    if isinstance(body, str):
        return [body]
    if body is None:
        return []
    return [json.dumps(body)]


def _raise_for_response(endpoint: str, response: httpx.Response) -> None:
    """Map a non-2xx answer to the driver's exception types; keep the whole chain in details."""
    if response.is_success:
        return
    chain = _error_chain(response)
    status = response.status_code
    details = {"endpoint": endpoint, "status": status, "chain": chain}
    # The first element is always the generic "Error from API"; the rest says what happened.
    meaningful = [item for item in chain if item.lower() != "error from api"] or [response.reason_phrase]
    message = f"cloud-hypervisor {endpoint} failed: {': '.join(meaningful)}"
    state_like = any(_STATE_ERROR_RE.search(item) for item in chain)
    if status in (405, 429) or (status in (404, 500) and state_like):
        raise VmmStateError(message, details=details)
    raise VmmError(message, details=details)


# --------------------------------------------------------------------------------------------
# Transport + one method per endpoint
# --------------------------------------------------------------------------------------------


class PciDeviceInfo(TypedDict):
    """Answer of a hot ``vm.add-*``."""

    id: str
    bdf: str


class ChApiClient:
    """Blocking client of one Cloud Hypervisor API socket.

    Every method takes an optional ``timeout`` (seconds) overriding the client's default.
    Errors are raised as ``VmmError`` subclasses; nothing of httpx leaks out.
    """

    def __init__(self, socket_path: str | os.PathLike[str], *, timeout: float = DEFAULT_API_TIMEOUT) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=self.socket_path),
            base_url=API_BASE_URL,
            timeout=timeout,
        )

    def close(self) -> None:
        """Close the underlying connection pool."""
        self._http.close()

    def __enter__(self) -> ChApiClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _request(
        self,
        method: str,
        endpoint: str,
        body: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        allow_disconnect: bool = False,
    ) -> httpx.Response | None:
        """Send one request; transport failures and error answers are mapped here only.

        ``allow_disconnect``: the VMM may close the connection instead of answering (it exits
        right after ``vmm.shutdown``); then ``None`` is returned.
        """
        effective = self.timeout if timeout is None else timeout
        if not os.path.exists(self.socket_path):
            # Checked up front: httpcore leaks the socket object when a Unix connect fails.
            raise VmmNotRunning(
                f"cloud-hypervisor API socket missing ({endpoint})",
                details={"endpoint": endpoint, "socket": self.socket_path},
            )
        try:
            response = self._http.request(
                method,
                f"/{endpoint}",
                json=dict(body) if body is not None else None,
                timeout=httpx.Timeout(effective),
            )
        except httpx.TimeoutException as exc:
            raise VmmTimeout(
                f"cloud-hypervisor {endpoint} did not answer within {effective:g}s",
                details={"endpoint": endpoint, "socket": self.socket_path, "cause": repr(exc)},
            ) from exc
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            if allow_disconnect:
                return None
            raise VmmError(
                f"cloud-hypervisor {endpoint}: connection broken",
                details={"endpoint": endpoint, "socket": self.socket_path, "cause": repr(exc)},
            ) from exc
        except httpx.TransportError as exc:
            # Connect failures: the socket is missing or nobody listens.
            raise VmmNotRunning(
                f"cloud-hypervisor API socket not reachable ({endpoint})",
                details={"endpoint": endpoint, "socket": self.socket_path, "cause": repr(exc)},
            ) from exc
        _raise_for_response(endpoint, response)
        return response

    def _json(self, response: httpx.Response | None, endpoint: str) -> Any:
        if response is None or not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise VmmError(
                f"cloud-hypervisor {endpoint}: answer is not JSON",
                details={"endpoint": endpoint, "body": response.text[:500]},
            ) from exc

    def _action(self, endpoint: str, body: Mapping[str, Any] | None = None, *, timeout: float | None) -> None:
        self._request("PUT", endpoint, body, timeout=timeout)

    def _add_device(self, endpoint: str, config: Mapping[str, Any], *, timeout: float | None) -> PciDeviceInfo | None:
        response = self._request("PUT", endpoint, config, timeout=timeout)
        data = self._json(response, endpoint)
        if isinstance(data, dict) and "id" in data and "bdf" in data:
            return PciDeviceInfo(id=str(data["id"]), bdf=str(data["bdf"]))
        return None

    # -- VMM ------------------------------------------------------------------------------

    def vmm_ping(self, *, timeout: float | None = None) -> JsonObject:
        """``GET vmm.ping``: ``{version, build_version?, pid?, features?}``."""
        data = self._json(self._request("GET", "vmm.ping", timeout=timeout), "vmm.ping")
        if not isinstance(data, dict) or "version" not in data:
            raise VmmError("cloud-hypervisor vmm.ping: unexpected answer", details={"body": data})
        return data

    def vmm_shutdown(self, *, timeout: float | None = None) -> None:
        """``PUT vmm.shutdown``: the VMM process exits. The real binary answers 200 (spec: 204);
        both are accepted, and so is the connection closing before the answer."""
        self._request("PUT", "vmm.shutdown", timeout=timeout, allow_disconnect=True)

    # -- VM lifecycle ---------------------------------------------------------------------

    def vm_create(self, config: Mapping[str, Any], *, timeout: float | None = None) -> None:
        """``PUT vm.create`` with a ``VmConfig`` (``payload`` is required by the spec)."""
        self._action("vm.create", config, timeout=timeout)

    def vm_boot(self, *, timeout: float | None = None) -> None:
        """``PUT vm.boot``: boot the created VM (also boots again after ``vm.shutdown``)."""
        self._action("vm.boot", timeout=timeout)

    def vm_info(self, *, timeout: float | None = None) -> JsonObject:
        """``GET vm.info``: ``{config, state, memory_actual_size?, device_tree?}``."""
        data = self._json(self._request("GET", "vm.info", timeout=timeout), "vm.info")
        if not isinstance(data, dict) or "state" not in data:
            raise VmmError("cloud-hypervisor vm.info: unexpected answer", details={"body": data})
        return data

    def vm_pause(self, *, timeout: float | None = None) -> None:
        """``PUT vm.pause`` (VM must be running)."""
        self._action("vm.pause", timeout=timeout)

    def vm_resume(self, *, timeout: float | None = None) -> None:
        """``PUT vm.resume`` (VM must be paused)."""
        self._action("vm.resume", timeout=timeout)

    def vm_reboot(self, *, timeout: float | None = None) -> None:
        """``PUT vm.reboot``."""
        self._action("vm.reboot", timeout=timeout)

    def vm_power_button(self, *, timeout: float | None = None) -> None:
        """``PUT vm.power-button``: ACPI power button; the guest decides whether to power off."""
        self._action("vm.power-button", timeout=timeout)

    def vm_shutdown(self, *, timeout: float | None = None) -> None:
        """``PUT vm.shutdown``: stop the VM at once; the VMM process stays."""
        self._action("vm.shutdown", timeout=timeout)

    def vm_delete(self, *, timeout: float | None = None) -> None:
        """``PUT vm.delete``: drop the VM (and its stored config) from the VMM."""
        self._action("vm.delete", timeout=timeout)

    # -- resources ------------------------------------------------------------------------

    def vm_resize(
        self, desired_vcpus: int | None = None, desired_ram: int | None = None, *, timeout: float | None = None
    ) -> None:
        """``PUT vm.resize``; ``desired_ram`` is in bytes. At least one value is required."""
        body: JsonObject = {}
        if desired_vcpus is not None:
            body["desired_vcpus"] = desired_vcpus
        if desired_ram is not None:
            body["desired_ram"] = desired_ram
        if not body:
            raise ValueError("vm_resize needs desired_vcpus or desired_ram")
        self._action("vm.resize", body, timeout=timeout)

    def vm_counters(self, *, timeout: float | None = None) -> dict[str, dict[str, int]]:
        """``GET vm.counters``: per device id, counter name -> value."""
        data = self._json(self._request("GET", "vm.counters", timeout=timeout), "vm.counters")
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise VmmError("cloud-hypervisor vm.counters: unexpected answer", details={"body": data})
        return {
            str(device): {str(k): int(v) for k, v in values.items() if isinstance(v, int)}
            for device, values in data.items()
            if isinstance(values, dict)
        }

    # -- devices --------------------------------------------------------------------------

    def vm_add_net(self, config: Mapping[str, Any], *, timeout: float | None = None) -> PciDeviceInfo | None:
        """``PUT vm.add-net`` (``NetConfig``). Returns ``{id, bdf}`` when hot-added to a booted
        VM, ``None`` when only the stored config was edited (before boot)."""
        return self._add_device("vm.add-net", config, timeout=timeout)

    def vm_add_disk(self, config: Mapping[str, Any], *, timeout: float | None = None) -> PciDeviceInfo | None:
        """``PUT vm.add-disk`` (``DiskConfig``); see ``vm_add_net`` for the result."""
        return self._add_device("vm.add-disk", config, timeout=timeout)

    def vm_add_vsock(self, config: Mapping[str, Any], *, timeout: float | None = None) -> PciDeviceInfo | None:
        """``PUT vm.add-vsock`` (``VsockConfig``: ``cid`` >= 3, ``socket``); one per VM."""
        return self._add_device("vm.add-vsock", config, timeout=timeout)

    def vm_remove_device(self, device_id: str, *, timeout: float | None = None) -> None:
        """``PUT vm.remove-device`` ``{id}``."""
        self._action("vm.remove-device", {"id": device_id}, timeout=timeout)

    # -- snapshot -------------------------------------------------------------------------

    def vm_snapshot(self, destination_url: str, *, timeout: float | None = None) -> None:
        """``PUT vm.snapshot`` ``{destination_url: "file:///dir"}``; the VM must be paused and
        the directory must exist."""
        self._action("vm.snapshot", {"destination_url": destination_url}, timeout=timeout)

    def vm_restore(
        self,
        source_url: str,
        *,
        resume: bool | None = None,
        prefault: bool | None = None,
        memory_restore_mode: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """``PUT vm.restore`` (``RestoreConfig``) into a VMM that has no VM. Without
        ``resume=True`` the VM comes back paused."""
        body: JsonObject = {"source_url": source_url}
        if resume is not None:
            body["resume"] = resume
        if prefault is not None:
            body["prefault"] = prefault
        if memory_restore_mode is not None:
            body["memory_restore_mode"] = memory_restore_mode
        self._action("vm.restore", body, timeout=timeout)


# --------------------------------------------------------------------------------------------
# Event monitor
# --------------------------------------------------------------------------------------------


class ChEvent(TypedDict):
    """One event-monitor record. ``timestamp`` is seconds since the VMM started."""

    timestamp: float
    source: str
    event: str
    properties: dict[str, str] | None


def _to_event(obj: object) -> ChEvent | None:
    if not isinstance(obj, dict) or "event" not in obj or "source" not in obj:
        return None
    ts = obj.get("timestamp")
    if isinstance(ts, dict):
        seconds = float(ts.get("secs", 0)) + float(ts.get("nanos", 0)) / 1e9
    elif isinstance(ts, int | float):
        seconds = float(ts)
    else:
        seconds = 0.0
    props = obj.get("properties")
    return ChEvent(
        timestamp=seconds,
        source=str(obj["source"]),
        event=str(obj["event"]),
        properties={str(k): str(v) for k, v in props.items()} if isinstance(props, dict) else None,
    )


class EventStreamParser:
    """Incremental parser of the event-monitor stream: pretty-printed JSON objects separated
    by a blank line (pretty JSON never contains an empty line, strings escape newlines).

    Bound: at most ``max_buffer`` bytes of an unfinished record are kept. Overflow rule: the
    oversized record is dropped (counted in ``dropped_bytes``) and parsing resynchronises at
    the next blank line. Records that are not valid JSON are skipped (``bad_records``).
    """

    SEPARATOR = b"\n\n"

    def __init__(self, *, max_buffer: int = 64 * 1024) -> None:
        self.max_buffer = max_buffer
        self._buffer = bytearray()
        self._discarding = False
        self.dropped_bytes = 0
        self.bad_records = 0

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished record held now (always <= ``max_buffer``)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[ChEvent]:
        """Add bytes as they were written; return the events completed by them."""
        events: list[ChEvent] = []
        self._buffer += data
        while True:
            index = self._buffer.find(self.SEPARATOR)
            if index < 0:
                break
            record = bytes(self._buffer[:index])
            del self._buffer[: index + len(self.SEPARATOR)]
            if self._discarding:
                self.dropped_bytes += len(record)
                self._discarding = False
                continue
            if not record.strip():
                continue
            try:
                event = _to_event(json.loads(record))
            except ValueError:
                event = None
            if event is None:
                self.bad_records += 1
            else:
                events.append(event)
        if len(self._buffer) > self.max_buffer:
            # Keep a trailing "\n" so a separator split across two feeds is still seen.
            keep = 1 if self._buffer.endswith(b"\n") else 0
            self.dropped_bytes += len(self._buffer) - keep
            del self._buffer[: len(self._buffer) - keep]
            self._discarding = True
        return events


class EventMonitorReader:
    """Follows an event-monitor file from a byte ``offset`` (persist ``offset`` to resume after
    a restart). Reads at most ``chunk_size`` bytes per ``read()`` call; if the file shrinks (the
    VMM was restarted and truncated it) reading restarts from the beginning."""

    def __init__(
        self, path: str | os.PathLike[str], *, offset: int = 0, max_buffer: int = 64 * 1024, chunk_size: int = 65536
    ) -> None:
        self.path = Path(path)
        self.offset = offset
        self.chunk_size = chunk_size
        self.parser = EventStreamParser(max_buffer=max_buffer)

    def read(self) -> list[ChEvent]:
        """Return the events completed since the last call (empty if the file is missing)."""
        try:
            with self.path.open("rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < self.offset:
                    self.offset = 0
                    self.parser = EventStreamParser(max_buffer=self.parser.max_buffer)
                fh.seek(self.offset)
                data = fh.read(self.chunk_size)
        except FileNotFoundError:
            return []
        self.offset += len(data)
        return self.parser.feed(data)

    def __iter__(self) -> Iterator[ChEvent]:
        """Drain everything currently in the file."""
        while True:
            before = self.offset
            yield from self.read()
            if self.offset == before:
                return


_EVENT_STATES: dict[tuple[str, str], RuntimeState] = {
    ("vm", "booted"): RuntimeState.RUNNING,
    ("vm", "resumed"): RuntimeState.RUNNING,
    ("vm", "rebooted"): RuntimeState.RUNNING,
    ("vm", "paused"): RuntimeState.PAUSED,
    # A restore without resume=true leaves the VM paused; a "resumed" event follows otherwise.
    ("vm", "restored"): RuntimeState.PAUSED,
    ("vm", "shutdown"): RuntimeState.SHUTDOWN,
    ("vm", "deleted"): RuntimeState.SHUTDOWN,
    ("vmm", "shutdown"): RuntimeState.GONE,
}


def event_to_state(event: ChEvent) -> RuntimeState | None:
    """The ``RuntimeState`` an event moves the VM into, or ``None`` for events that do not
    change it (``booting``, ``pausing``, device events, ``guest panic`` ...)."""
    return _EVENT_STATES.get((event["source"], event["event"]))


# --------------------------------------------------------------------------------------------
# Host checks and process helpers (private: the QEMU driver has its own in process.py)
# --------------------------------------------------------------------------------------------


def kvm_usable() -> bool:
    """Hardware KVM that can run ordinary guests: /dev/kvm opens read-write, the CPU has
    vmx/svm, and the kvm module is not PVM (which cannot run Cloud Hypervisor guests)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    if not re.search(r"^flags\s*:.*\b(?:vmx|svm)\b", cpuinfo, re.MULTILINE):
        return False
    return not Path("/sys/module/kvm_pvm").exists()


def cloud_hypervisor_available(binary: str = "cloud-hypervisor") -> bool:
    """True when ``binary`` is on PATH (or an executable path) and hardware KVM is usable."""
    return shutil.which(binary) is not None and kvm_usable()


# Popen objects of VMMs this process spawned, so they can be reaped (no zombies) and are
# not garbage-collected with a "still running" warning. Other processes use /proc.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _pid_alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        _CHILDREN.pop(pid, None)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # Field 3 (after the parenthesised command) is the state; Z = zombie = dead.
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _pid_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _kill(pid: int, sig: signal.Signals) -> None:
    # The VMM leads its own session/process group (start_new_session): signal the group so
    # helpers it may have forked go too; fall back to the pid alone.
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _terminate(pid: int, *, term_timeout: float = 5.0, kill_timeout: float = 5.0) -> bool:
    """SIGTERM, wait, SIGKILL, wait. True when the process is gone."""
    if not _pid_alive(pid):
        return True
    _kill(pid, signal.SIGTERM)
    if _wait_until(lambda: not _pid_alive(pid), term_timeout):
        return True
    _kill(pid, signal.SIGKILL)
    return _wait_until(lambda: not _pid_alive(pid), kill_timeout)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _file_url(path: Path) -> str:
    # CH strips the "file://" prefix and uses the rest verbatim (no percent-decoding), so
    # Path.as_uri() would break paths with spaces or other escaped characters.
    return f"file://{path}"


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - limit))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChRuntimePaths:
    """Files of one VM's runtime directory (see ``base.py``)."""

    root: Path

    @property
    def api_socket(self) -> Path:
        return self.root / "api.sock"

    @property
    def serial_socket(self) -> Path:
        return self.root / "serial.sock"

    @property
    def agent_socket(self) -> Path:
        return self.root / "agent.sock"

    @property
    def events(self) -> Path:
        return self.root / "events.json"

    @property
    def log(self) -> Path:
        return self.root / "vmm.log"

    @property
    def pid_file(self) -> Path:
        return self.root / "vmm.pid"

    @property
    def spec_file(self) -> Path:
        return self.root / "spec.json"

    @property
    def overlay(self) -> Path:
        return self.root / "overlay.qcow2"

    @property
    def sockets(self) -> tuple[Path, ...]:
        return (self.api_socket, self.serial_socket, self.agent_socket)


@dataclass(frozen=True)
class ChSnapshot:
    """Result of ``CloudHypervisorDriver.snapshot``: snapshots are not portable across
    Cloud Hypervisor versions, so the version is recorded with it."""

    path: Path
    vmm_version: str
    disk_copied: bool


SNAPSHOT_META = "microvm-snapshot.json"
SNAPSHOT_OVERLAY = "overlay.qcow2"
# sun_path holds 108 bytes with the NUL; guest-initiated vsock listeners add "_<port>".
_MAX_SOCKET_PATH = 107 - len("_65535")


def _check_socket_paths(paths: ChRuntimePaths) -> None:
    longest = max(len(os.fsencode(sock)) for sock in paths.sockets)
    if longest > _MAX_SOCKET_PATH:
        raise VmmError(
            f"runtime directory path too long for Unix sockets ({longest} > {_MAX_SOCKET_PATH} bytes)",
            details={"dir": str(paths.root)},
        )


def build_vm_config(spec: VmSpec) -> JsonObject:
    """The ``VmConfig`` for ``vm.create``: serial on a socket (the host daemon attaches to it),
    virtio-console off, hybrid vsock for the guest agent, overlay disk, optional TAP."""
    paths = ChRuntimePaths(spec.runtime_dir)
    payload: JsonObject = {"kernel": str(spec.kernel)}
    if spec.cmdline:
        payload["cmdline"] = spec.cmdline
    if spec.initramfs is not None:
        payload["initramfs"] = str(spec.initramfs)
    config: JsonObject = {
        "payload": payload,
        "cpus": {"boot_vcpus": spec.vcpus, "max_vcpus": max(spec.vcpus, spec.max_vcpus)},
        "memory": {"size": spec.memory_mib * MIB},
        "disks": [
            {
                "id": "disk0",
                "path": str(paths.overlay),
                "image_type": "Qcow2",
                # CH refuses to follow qcow2 backing files unless told to.
                "backing_files": True,
            }
        ],
        "serial": {"mode": "Socket", "socket": str(paths.serial_socket)},
        "console": {"mode": "Off"},
        "vsock": {"cid": spec.vsock_cid, "socket": str(paths.agent_socket)},
    }
    hotplug = spec.max_memory_mib - spec.memory_mib
    if hotplug > 0:
        config["memory"]["hotplug_size"] = hotplug * MIB
    if spec.tap:
        net: JsonObject = {"id": "net0", "tap": spec.tap}
        if spec.mac:
            net["mac"] = spec.mac
        config["net"] = [net]
    return config


_CH_STATES: dict[str, RuntimeState] = {
    "Created": RuntimeState.CREATED,
    "Running": RuntimeState.RUNNING,
    "Paused": RuntimeState.PAUSED,
    "Shutdown": RuntimeState.SHUTDOWN,
    # Stopped at a gdb breakpoint: not running guest code.
    "BreakPoint": RuntimeState.PAUSED,
}


class CloudHypervisorDriver:
    """``Driver`` for Cloud Hypervisor: one detached ``cloud-hypervisor`` process per VM,
    driven over its REST API socket. Stateless: everything lives in ``spec.runtime_dir``."""

    name = "cloud-hypervisor"

    def __init__(
        self,
        binary: str = "cloud-hypervisor",
        *,
        qemu_img: str = "qemu-img",
        api_timeout: float = DEFAULT_API_TIMEOUT,
        seccomp: str = "true",
        base_image_format: str = "raw",
    ) -> None:
        self.binary = binary
        self.qemu_img = qemu_img
        self.api_timeout = api_timeout
        self.seccomp = seccomp
        self.base_image_format = base_image_format

    # -- helpers --------------------------------------------------------------------------

    def _client(self, spec: VmSpec, timeout: float | None = None) -> ChApiClient:
        return ChApiClient(ChRuntimePaths(spec.runtime_dir).api_socket, timeout=timeout or self.api_timeout)

    def vmm_pid(self, spec: VmSpec) -> int | None:
        """Pid of this VM's live VMM, or ``None``. The pid file is trusted only if the process
        is alive, not a zombie, and its command line names this VM's API socket (pid reuse)."""
        paths = ChRuntimePaths(spec.runtime_dir)
        try:
            pid = int(paths.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if pid <= 0 or not _pid_alive(pid):
            return None
        cmdline = _pid_cmdline(pid)
        if cmdline and not any(str(paths.api_socket) in arg for arg in cmdline):
            return None
        return pid

    def _remove_stale_sockets(self, paths: ChRuntimePaths) -> None:
        # CH does not remove its sockets on exit and fails with "Address already in use".
        for sock in paths.sockets:
            _unlink(sock)

    def _spawn(self, spec: VmSpec) -> int:
        paths = ChRuntimePaths(spec.runtime_dir)
        self._remove_stale_sockets(paths)
        argv = [
            self.binary,
            "--api-socket",
            f"path={paths.api_socket}",
            "--event-monitor",
            f"path={paths.events}",
            "--log-file",
            str(paths.log),
            "--seccomp",
            self.seccomp,
        ]
        log_fd = os.open(paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            # The TAP is opened by name: start CH in the namespace that holds it.
            proc = call_in_netns(
                spec.netns,
                lambda: subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_fd,
                    stderr=log_fd,
                    cwd=spec.runtime_dir,
                    close_fds=True,
                    start_new_session=True,
                ),
            )
        except OSError as exc:
            raise VmmError(f"cannot start {self.binary}: {exc}", details={"argv": argv}) from exc
        finally:
            os.close(log_fd)
        _CHILDREN[proc.pid] = proc
        _write_atomic(paths.pid_file, f"{proc.pid}\n")
        return proc.pid

    def _wait_for_api(self, spec: VmSpec, pid: int, timeout: float) -> JsonObject:
        paths = ChRuntimePaths(spec.runtime_dir)
        deadline = time.monotonic() + timeout
        last: VmmError | None = None
        with self._client(spec, timeout=1.0) as api:
            while time.monotonic() < deadline:
                if not _pid_alive(pid):
                    raise VmmError(
                        "cloud-hypervisor exited during start-up",
                        details={"pid": pid, "log": _tail(paths.log)},
                    )
                if paths.api_socket.exists():
                    try:
                        return api.vmm_ping(timeout=min(1.0, max(0.1, deadline - time.monotonic())))
                    except (VmmNotRunning, VmmTimeout, VmmError) as exc:
                        last = exc
                time.sleep(0.05)
        raise VmmTimeout(
            f"cloud-hypervisor API not ready within {timeout:g}s",
            details={"pid": pid, "last_error": repr(last), "log": _tail(paths.log)},
        )

    def _create_vm(self, api: ChApiClient, config: JsonObject, timeout: float) -> None:
        # A failed vm.create can leave a stored VM behind: delete it before retrying, once.
        try:
            api.vm_create(config, timeout=timeout)
            return
        except VmmError as first:
            with contextlib.suppress(VmmError):
                api.vm_delete(timeout=timeout)
            try:
                api.vm_create(config, timeout=timeout)
            except VmmError as second:
                raise VmmError(
                    second.message, details={"first_error": first.details, "retry_error": second.details}
                ) from second

    # -- Driver protocol ------------------------------------------------------------------

    def prepare(self, spec: VmSpec) -> None:
        """Create the runtime directory, ``spec.json`` and the qcow2 overlay on top of the
        (raw) base image. Idempotent: an existing overlay is kept."""
        paths = ChRuntimePaths(spec.runtime_dir)
        _check_socket_paths(paths)
        paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_atomic(paths.spec_file, spec.to_json())
        if paths.overlay.exists():
            return
        base = spec.base_image.resolve()
        if not base.is_file():
            raise VmmError(f"base image not found: {base}", details={"base_image": str(base)})
        size = max(spec.disk_gib * 1024**3, base.stat().st_size)
        tmp = paths.root / ".overlay.qcow2.tmp"
        _unlink(tmp)
        argv = [
            self.qemu_img, "create", "-q", "-f", "qcow2",
            "-b", str(base), "-F", spec.extra.get("base_format", self.base_image_format),
            str(tmp), str(size),
        ]  # fmt: skip
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise VmmError(f"qemu-img failed: {exc}", details={"argv": argv}) from exc
        if result.returncode != 0:
            raise VmmError(
                "could not create the disk overlay",
                details={"argv": argv, "stderr": result.stderr[-2000:], "returncode": result.returncode},
            )
        os.replace(tmp, paths.overlay)

    def launch(self, spec: VmSpec, *, timeout: float = 30.0) -> LaunchResult:
        """Spawn ``cloud-hypervisor`` detached (own session, stdin closed, pid file), wait for
        ``vmm.ping``, ``vm.create`` (delete + retry once on failure), ``vm.boot``.

        Idempotent: if this VM's VMM already runs a booted VM, that one is reported."""
        paths = ChRuntimePaths(spec.runtime_dir)
        if not paths.root.is_dir():
            raise VmmError("runtime directory missing: call prepare() first", details={"dir": str(paths.root)})
        deadline = time.monotonic() + timeout
        pid = self.vmm_pid(spec)
        state: str | None = None
        if pid is None:
            pid = self._spawn(spec)
        ping = self._wait_for_api(spec, pid, max(0.5, deadline - time.monotonic()))
        with self._client(spec) as api:
            try:
                state = str(api.vm_info().get("state"))
            except VmmStateError:
                state = None  # no VM in this VMM yet
            try:
                if state is None:
                    self._create_vm(api, build_vm_config(spec), timeout=max(1.0, deadline - time.monotonic()))
                    state = "Created"
                if state in ("Created", "Shutdown"):
                    api.vm_boot(timeout=max(1.0, deadline - time.monotonic()))
            except VmmError as exc:
                details = dict(exc.details) if isinstance(exc.details, dict) else {"cause": exc.details}
                details["log"] = _tail(paths.log)
                raise type(exc)(exc.message, details=details) from exc
        return LaunchResult(pid=pid, driver=self.name, acceleration="kvm", vmm_version=str(ping.get("version", "")))

    def info(self, spec: VmSpec, *, timeout: float = 5.0) -> VmRuntimeInfo:
        """Map ``vm.info``: Created/Running/Paused/Shutdown (BreakPoint -> paused). ``GONE``
        when no VMM runs; ``SHUTDOWN`` when the VMM runs but holds no VM."""
        pid = self.vmm_pid(spec)
        if pid is None:
            return VmRuntimeInfo(state=RuntimeState.GONE, pid=None)
        with self._client(spec, timeout) as api:
            try:
                data = api.vm_info(timeout=timeout)
            except VmmStateError as exc:
                return VmRuntimeInfo(state=RuntimeState.SHUTDOWN, pid=pid, raw={"error": exc.details})
            except VmmNotRunning:
                if self.vmm_pid(spec) is None:
                    return VmRuntimeInfo(state=RuntimeState.GONE, pid=None)
                raise
        state = _CH_STATES.get(str(data.get("state")))
        if state is None:
            raise VmmError(f"unknown cloud-hypervisor state {data.get('state')!r}", details={"info": data})
        config = data.get("config") or {}
        cpus = config.get("cpus") or {}
        memory = config.get("memory") or {}
        vcpus = cpus.get("boot_vcpus")
        mem_bytes = data.get("memory_actual_size")
        if not isinstance(mem_bytes, int):
            size = memory.get("size")
            mem_bytes = size + int(memory.get("hotplugged_size") or 0) if isinstance(size, int) else None
        return VmRuntimeInfo(
            state=state,
            pid=pid,
            vcpus=vcpus if isinstance(vcpus, int) else None,
            memory_mib=mem_bytes // MIB if isinstance(mem_bytes, int) else None,
            raw=data,
        )

    def _require_pid(self, spec: VmSpec) -> int:
        pid = self.vmm_pid(spec)
        if pid is None:
            raise VmmNotRunning("no cloud-hypervisor process runs for this VM", details={"vm_id": spec.vm_id})
        return pid

    def pause(self, spec: VmSpec, *, timeout: float = 10.0) -> None:
        """``vm.pause``; ``VmmStateError`` unless running."""
        self._require_pid(spec)
        with self._client(spec, timeout) as api:
            api.vm_pause()

    def resume(self, spec: VmSpec, *, timeout: float = 10.0) -> None:
        """``vm.resume``; ``VmmStateError`` unless paused."""
        self._require_pid(spec)
        with self._client(spec, timeout) as api:
            api.vm_resume()

    def reboot(self, spec: VmSpec, *, timeout: float = 10.0) -> None:
        """``vm.reboot``."""
        self._require_pid(spec)
        with self._client(spec, timeout) as api:
            api.vm_reboot()

    def shutdown(self, spec: VmSpec, *, graceful_timeout: float = 30.0, force: bool = False) -> None:
        """Power button, wait up to ``graceful_timeout`` for the guest to power off (state
        Shutdown, or the VMM exits as it does by default), then ``vmm.shutdown``, then
        SIGTERM/SIGKILL. Afterwards no VMM runs and its sockets are removed."""
        paths = ChRuntimePaths(spec.runtime_dir)
        pid = self.vmm_pid(spec)
        if pid is not None and not force:
            with self._client(spec, min(self.api_timeout, 5.0)) as api:
                try:
                    api.vm_power_button()
                    pressed = True
                except VmmError:
                    pressed = False  # not running (paused, created, no VM): nothing to wait for

                def powered_off() -> bool:
                    if not _pid_alive(pid):
                        return True
                    try:
                        return str(api.vm_info(timeout=1.0).get("state")) in ("Shutdown", "Created")
                    except VmmError:
                        return not _pid_alive(pid)

                if pressed:
                    _wait_until(powered_off, graceful_timeout, interval=0.2)
                if _pid_alive(pid):
                    with contextlib.suppress(VmmError):
                        api.vmm_shutdown(timeout=5.0)
            _wait_until(lambda: not _pid_alive(pid), 5.0)
        if pid is not None and not _terminate(pid):
            raise VmmError("cloud-hypervisor did not die after SIGKILL", details={"pid": pid})
        _CHILDREN.pop(pid or -1, None)
        self._remove_stale_sockets(paths)
        _unlink(paths.pid_file)

    def resize(self, spec: VmSpec, *, vcpus: int | None, memory_mib: int | None, timeout: float = 10.0) -> None:
        """``vm.resize``. Needs ``max_vcpus``/``max_memory_mib`` from launch time; growing past
        them or shrinking memory (ACPI hotplug only grows) raises ``VmmUnsupported``. Memory
        grows in 128 MiB steps; new vCPUs must be onlined by the guest."""
        if vcpus is None and memory_mib is None:
            return
        if vcpus is not None and not 1 <= vcpus <= max(spec.vcpus, spec.max_vcpus):
            raise VmmUnsupported(
                f"{vcpus} vCPUs is outside 1..{spec.max_vcpus}: restart with a larger maximum",
                details={"vcpus": vcpus, "max_vcpus": spec.max_vcpus},
            )
        if memory_mib is not None and memory_mib > max(spec.memory_mib, spec.max_memory_mib):
            raise VmmUnsupported(
                f"{memory_mib} MiB is above the hotplug limit of {spec.max_memory_mib} MiB: restart needed",
                details={"memory_mib": memory_mib, "max_memory_mib": spec.max_memory_mib},
            )
        if memory_mib is not None:
            current = self.info(spec, timeout=timeout).memory_mib
            if current is not None and memory_mib < current:
                raise VmmUnsupported(
                    "memory cannot shrink with ACPI hotplug: restart needed",
                    details={"memory_mib": memory_mib, "current_mib": current},
                )
        self._require_pid(spec)
        with self._client(spec, timeout) as api:
            api.vm_resize(desired_vcpus=vcpus, desired_ram=memory_mib * MIB if memory_mib is not None else None)

    def counters(self, spec: VmSpec, *, timeout: float = 5.0) -> dict[str, dict[str, int]]:
        """``vm.counters``: per device id (``disk0``, ``net0``...) its counters."""
        self._require_pid(spec)
        with self._client(spec, timeout) as api:
            return api.vm_counters()

    def cleanup(self, spec: VmSpec) -> None:
        """Kill any VMM left and remove the runtime directory. Idempotent."""
        self.shutdown(spec, force=True)
        shutil.rmtree(spec.runtime_dir, ignore_errors=True)
        if spec.runtime_dir.exists():
            raise VmmError("could not remove the runtime directory", details={"dir": str(spec.runtime_dir)})

    # -- snapshot / restore ---------------------------------------------------------------

    def snapshot(self, spec: VmSpec, dest_dir: Path, *, copy_disk: bool = True, timeout: float = 120.0) -> ChSnapshot:
        """Pause -> ``vm.snapshot file://dest_dir`` -> resume (only if it was running).

        CH does not copy disks; with ``copy_disk`` the overlay is copied while the VM is still
        paused, so disk and memory are consistent. Writes ``microvm-snapshot.json`` (VMM
        version, vm id) beside CH's ``config.json``/``state.json``/``memory-ranges``."""
        paths = ChRuntimePaths(spec.runtime_dir)
        self._require_pid(spec)
        dest_dir = dest_dir.resolve()
        dest_dir.mkdir(parents=True, exist_ok=True)
        with self._client(spec, timeout) as api:
            version = str(api.vmm_ping().get("version", ""))
            state = str(api.vm_info().get("state"))
            if state not in ("Running", "Paused"):
                raise VmmStateError(f"cannot snapshot a VM in state {state}", details={"state": state})
            was_running = state == "Running"
            if was_running:
                api.vm_pause()
            try:
                api.vm_snapshot(_file_url(dest_dir), timeout=timeout)
                if copy_disk:
                    shutil.copyfile(paths.overlay, dest_dir / SNAPSHOT_OVERLAY)
            finally:
                if was_running:
                    api.vm_resume()
        meta = {"driver": self.name, "vmm_version": version, "vm_id": spec.vm_id, "disk_copied": copy_disk}
        _write_atomic(dest_dir / SNAPSHOT_META, json.dumps(meta, sort_keys=True))
        return ChSnapshot(path=dest_dir, vmm_version=version, disk_copied=copy_disk)

    def restore(self, spec: VmSpec, src_dir: Path, *, resume: bool = True, timeout: float = 120.0) -> LaunchResult:
        """Restore ``src_dir`` into a fresh VMM for ``spec`` (``PUT vm.restore``).

        The snapshot's ``config.json`` names the original VM's sockets, disk and TAP; a staged
        copy is rewritten with this spec's paths (so a clone can run beside the original) and
        the large files are symlinked, not copied. The snapshot's disk copy, if any, replaces
        this VM's overlay. ``VmmStateError`` if a VMM already runs for ``spec``."""
        paths = ChRuntimePaths(spec.runtime_dir)
        src_dir = src_dir.resolve()
        _check_socket_paths(paths)
        if self.vmm_pid(spec) is not None:
            raise VmmStateError("a VMM already runs for this VM; restore needs a fresh one", details={})
        try:
            config = json.loads((src_dir / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise VmmError(f"not a snapshot directory: {src_dir}", details={"cause": repr(exc)}) from exc
        paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_atomic(paths.spec_file, spec.to_json())
        if (src_dir / SNAPSHOT_OVERLAY).exists():
            tmp = paths.root / ".overlay.qcow2.tmp"
            shutil.copyfile(src_dir / SNAPSHOT_OVERLAY, tmp)
            os.replace(tmp, paths.overlay)
        elif not paths.overlay.exists():
            self.prepare(spec)

        fresh = build_vm_config(spec)
        config["serial"] = fresh["serial"]
        config["console"] = fresh["console"]
        if isinstance(config.get("vsock"), dict):
            config["vsock"]["socket"] = fresh["vsock"]["socket"]
        for disk in config.get("disks") or []:
            if disk.get("id") == "disk0":
                disk["path"] = str(paths.overlay)
        for net in config.get("net") or []:
            if net.get("id") == "net0" and spec.tap:
                net["tap"] = spec.tap

        staging = paths.root / "restore"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for entry in src_dir.iterdir():
            if entry.name not in ("config.json", SNAPSHOT_OVERLAY, SNAPSHOT_META):
                (staging / entry.name).symlink_to(entry)
        _write_atomic(staging / "config.json", json.dumps(config))

        deadline = time.monotonic() + timeout
        pid = self._spawn(spec)
        try:
            ping = self._wait_for_api(spec, pid, min(30.0, timeout))
            with self._client(spec, max(1.0, deadline - time.monotonic())) as api:
                api.vm_restore(_file_url(staging))
                if resume:
                    api.vm_resume()
        except VmmError:
            self.shutdown(spec, force=True)
            raise
        return LaunchResult(pid=pid, driver=self.name, acceleration="kvm", vmm_version=str(ping.get("version", "")))
