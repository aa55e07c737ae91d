"""Cloud Hypervisor driver, layered like docker-py.

1. Transport: HTTP/1.1 over the VMM's Unix API socket (``httpx.HTTPTransport(uds=...)``),
   base URL ``http://localhost/api/v1``; every call has a timeout.
2. ``ChApiClient``: one method per REST endpoint the product uses.
3. Errors: ``_raise_for_response`` / ``_request`` are the ONE place where Cloud Hypervisor's
   status codes and JSON error chains (``["Error from API", "The VM could not be paused",
   "VM is not running"]``) become ``VmmStateError`` / ``VmmError`` / ``VmmTimeout`` /
   ``VmmNotRunning`` / ``VmmInvalidRequest``; the chain is kept in ``details``.
4. ``CloudHypervisorDriver``: the ``Driver`` protocol of ``base.py`` (capabilities, version,
   snapshot/restore included). Processes are started, found and killed with the shared
   ``vms.vmm.process`` layer, like QEMU's.

Also here: bounded readers of the ``--event-monitor`` file (incremental, and "the newest
64 KiB"), a mapping from events to ``RuntimeState`` and to the reason a guest stopped.

Nothing here imports Django. Everything the driver knows about a VM lives in its runtime
directory (see ``base.py``), so any process may call any method.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypedDict

import httpx

from vms.vmm.base import (
    BOOT_KERNEL,
    DEFAULT_MTU,
    MIGRATION_DISK_SHARED,
    OS_WINDOWS,
    AgentTransport,
    Driver,
    DriverCapabilities,
    LaunchResult,
    MigrationResult,
    MigrationTarget,
    MigrationTls,
    NicDevice,
    RuntimeState,
    VmmError,
    VmmInvalidRequest,
    VmmNotRunning,
    VmmStateError,
    VmmTimeout,
    VmmUnsupported,
    VmRuntimeInfo,
    VmSpec,
)
from vms.vmm.confinement import VmmConfinement
from vms.vmm.process import (
    LOG_FILE,
    PID_FILE,
    call_in_netns,
    kill_vmm,
    kvm_usable,
    listen_address_check,
    listening_socket,
    log_tail,
    pid_is_vmm,
    running_vmm_pid,
    spawn_detached,
    uri_host,
    wait_pid_exit,
)
from vms.vmm.snapshot import SnapshotMeta, backing_chain

__all__ = [
    "API_BASE_URL",
    "ChApiClient",
    "ChEvent",
    "CloudHypervisorDriver",
    "EventMonitorReader",
    "EventStreamParser",
    "GuestHistory",
    "build_payload",
    "build_vm_config",
    "cloud_hypervisor_available",
    "event_to_state",
    "guest_history",
    "read_recent_events",
    "rewrite_snapshot_config",
]

API_BASE_URL = "http://localhost/api/v1"
DEFAULT_API_TIMEOUT = 5.0
# vm.receive-migration answers at once only on an error (e.g. its port is taken); silence
# this long means it listens.
RECEIVE_ANSWER_SECONDS = 1.0
# vm.send-migration is bounded by its own timeout_s; we wait this much longer for its answer.
SEND_MARGIN_SECONDS = 30.0
MIB = 1024 * 1024

JsonObject = dict[str, Any]


# --------------------------------------------------------------------------------------------
# Errors: the one place where API answers become exceptions
# --------------------------------------------------------------------------------------------

# Wrong-state answers of the real binary are mostly 500 with a chain ending in one of these
# (thiserror texts like "VM is not running", Debug-formatted variants like
# "InvalidStateTransition(Running, Paused)" or "VmNotRunning", and "... while VM is running").
_STATE_ERROR_RE = re.compile(
    r"not (?:created|running|paused|booted|ready)"
    r"|already (?:created|running|paused|booted)"
    r"|config(?:uration)? (?:is )?missing|missing config"
    r"|invalid (?:vm )?state transition|invalidstatetransition"
    r"|while (?:the )?vm is (?:running|paused|booted|not running)"
    r"|\bvm(?:not(?:created|running|booted|paused)|already(?:created|running|booted))\b"
    r"|\bvmmissingconfig\b",
    re.IGNORECASE,
)
# ``vm.resize`` answers that mean "this VMM cannot grow like that" (bad step, no hotplug slot
# left, above the hotplug area, vCPUs above the maximum): the caller's request is invalid.
_RESIZE_REFUSAL_RE = re.compile(
    r"invalidsize|invalid size|noslotavailable|no slot available|insufficienthotplugram"
    r"|insufficient hotplug ram|desired vcpus|max(?:imum)? vcpus|hotplug limit|exceed",
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
    """Map a non-2xx answer to the driver's exception types; keep the whole chain in details.

    The one place where CH's answers become exceptions: wrong-state texts (whatever the
    status, except spec validation failures) -> ``VmmStateError``; a ``vm.resize`` the VMM
    cannot do -> ``VmmInvalidRequest``; everything else -> ``VmmError``."""
    if response.is_success:
        return
    chain = _error_chain(response)
    status = response.status_code
    details = {"endpoint": endpoint, "status": status, "chain": chain}
    # The first element is always the generic "Error from API"; the rest says what happened.
    meaningful = [item for item in chain if item.lower() != "error from api"] or [response.reason_phrase]
    message = f"cloud-hypervisor {endpoint} failed: {': '.join(meaningful)}"
    state_like = any(_STATE_ERROR_RE.search(item) for item in chain)
    if status in (405, 429) or (status != 400 and state_like):
        raise VmmStateError(message, details=details)
    if endpoint == "vm.resize" and status == 500 and any(_RESIZE_REFUSAL_RE.search(item) for item in chain):
        raise VmmInvalidRequest(message, details=details)
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

    def vm_receive_migration(self, receiver_url: str, *, answer_within: float) -> bool:
        """``PUT vm.receive-migration`` (``ReceiveMigrationData``): the VMM listens on
        ``receiver_url`` and answers only once a migration was received (or failed); its API
        serves nothing else meanwhile. Waits ``answer_within`` seconds for an early answer
        (an error, e.g. the port is taken: raised); ``False`` when none came (it listens)."""
        try:
            self._action("vm.receive-migration", {"receiver_url": receiver_url}, timeout=answer_within)
        except VmmTimeout:
            return False
        return True

    def vm_send_migration(
        self, destination_url: str, *, downtime_ms: int, timeout_s: int, timeout: float | None = None
    ) -> None:
        """``PUT vm.send-migration`` (``SendMigrationData``): answers once the VM was sent
        (the VMM then exits) or failed (the VM runs on here); ``timeout_s`` with the
        ``Cancel`` strategy bounds it inside the VMM too."""
        body = {
            "destination_url": destination_url,
            "downtime_ms": downtime_ms,
            "timeout_s": timeout_s,
            "timeout_strategy": "Cancel",
        }
        self._action("vm.send-migration", body, timeout=timeout)

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


RECENT_EVENTS_BYTES = 64 * 1024


def read_recent_events(path: str | os.PathLike[str], *, max_bytes: int = RECENT_EVENTS_BYTES) -> list[ChEvent]:
    """The events of the last ``max_bytes`` of an event-monitor file (empty when missing),
    read with one ``EventMonitorReader.read`` from ``size - max_bytes``.

    Bound: at most ``max_bytes`` are read and buffered, whatever the file's size. Overflow
    rule: older events are not seen; the record cut by the window's start does not parse and
    is skipped (the parser resynchronises at the next blank line)."""
    try:
        size = os.stat(path).st_size
    except OSError:
        return []
    reader = EventMonitorReader(path, offset=max(0, size - max_bytes), max_buffer=max_bytes, chunk_size=max_bytes)
    return reader.read()


@dataclass(frozen=True)
class GuestHistory:
    """What the event monitor tells about the guest since its VM last booted."""

    # A "vm shutdown" event: the guest powered off (the VMM stays: --no-shutdown), or the VMM
    # was told to stop while the VM ran.
    powered_off: bool = False
    panic: str = ""  # the pvpanic event's ``event`` property ("panic", "crash_loaded") or "panic"
    reboots: int = 0  # reboots since the boot (guest- or API-initiated)

    @property
    def reason(self) -> str:
        """Human text for ``VmRuntimeInfo.reason``; empty when nothing notable happened."""
        parts = []
        if self.panic:
            parts.append(f"guest panic ({self.panic})")
        if self.powered_off:
            parts.append("guest powered off")
        elif self.reboots and self.panic:
            parts.append("the guest rebooted")
        return "; ".join(parts)


def guest_history(events: list[ChEvent]) -> GuestHistory:
    """Fold events (oldest first) into what happened since the last boot or restore."""
    powered_off, panic, reboots = False, "", 0
    for event in events:
        key = (event["source"], event["event"])
        if key in (("vm", "booting"), ("vm", "booted"), ("vm", "restored"), ("vm", "deleted")):
            powered_off, panic, reboots = False, "", 0
        elif key == ("vm", "rebooted"):
            reboots += 1
            powered_off = False
        elif key == ("vm", "shutdown"):
            powered_off = True
        elif key == ("guest", "panic"):
            panic = (event["properties"] or {}).get("event") or "panic"
    return GuestHistory(powered_off=powered_off, panic=panic, reboots=reboots)


# --------------------------------------------------------------------------------------------
# Host checks and small helpers (processes: vms.vmm.process, shared with QEMU)
# --------------------------------------------------------------------------------------------


def cloud_hypervisor_available(binary: str = "cloud-hypervisor") -> bool:
    """True when ``binary`` is on PATH (or an executable path) and hardware KVM is usable
    (``vms.vmm.process.kvm_usable``: the same rules as QEMU's)."""
    return shutil.which(binary) is not None and kvm_usable()


def _wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


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


def _derived_mac(vm_id: str, device_id: str) -> str:
    """A stable, locally administered MAC for a clone's NIC that has none of its own."""
    digest = hashlib.sha256(f"{vm_id}/{device_id}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def _version_key(version: str) -> tuple[str, ...]:
    """``major.minor`` of a CH version ("v54.0.1", "54.0", "v54.0-fake" -> ("54", "0"))."""
    core = version.strip().lstrip("vV").split("-", 1)[0]
    return tuple(core.split(".")[:2])


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
        return self.root / LOG_FILE

    @property
    def pid_file(self) -> Path:
        return self.root / PID_FILE

    @property
    def spec_file(self) -> Path:
        return self.root / "spec.json"

    @property
    def overlay(self) -> Path:
        return self.root / "overlay.qcow2"

    @property
    def hotplugs(self) -> Path:
        # ACPI memory hot-adds done by the current VMM (CH allows HOTPLUG_SLOTS of them).
        return self.root / "memory-hotplugs"

    @property
    def sockets(self) -> tuple[Path, ...]:
        return (self.api_socket, self.serial_socket, self.agent_socket)


SNAPSHOT_OVERLAY = "overlay.qcow2"
SNAPSHOT_STATE = "state.json"
SNAPSHOT_CONFIG = "config.json"
# Files CH itself writes into a snapshot directory; the rest are ours.
_CH_SNAPSHOT_FILES = (SNAPSHOT_CONFIG, SNAPSHOT_STATE, "memory-ranges")
HOTPLUG_STEP_MIB = 128  # ACPI memory hotplug adds DIMMs of a multiple of 128 MiB
HOTPLUG_SLOTS = 8  # ... and has 8 slots per VMM
# sun_path holds 108 bytes with the NUL; guest-initiated vsock listeners add "_<port>".
_MAX_SOCKET_PATH = 107 - len("_65535")


def _check_socket_paths(paths: ChRuntimePaths) -> None:
    longest = max(len(os.fsencode(sock)) for sock in paths.sockets)
    if longest > _MAX_SOCKET_PATH:
        raise VmmError(
            f"runtime directory path too long for Unix sockets ({longest} > {_MAX_SOCKET_PATH} bytes)",
            details={"dir": str(paths.root)},
        )


def build_payload(spec: VmSpec, *, firmware: str = "") -> tuple[JsonObject, JsonObject]:
    """``(payload, platform)`` of the ``VmConfig``: kernel + initramfs + cmdline (direct
    boot), or the operator's firmware (``CLOUDHV.fd`` / rust-hypervisor-firmware) booting the
    disk, the ``sandbox.*`` words reaching the guest as SMBIOS OEM strings (firmware boot)."""
    if spec.boot_mode == BOOT_KERNEL:
        payload: JsonObject = {"kernel": str(spec.kernel)}
        if spec.cmdline:
            payload["cmdline"] = spec.cmdline
        if spec.initramfs is not None:
            payload["initramfs"] = str(spec.initramfs)
        return payload, {}
    if not firmware:
        raise VmmError("firmware boot needs a firmware file (set SANDBOX_CLOUD_HYPERVISOR_FIRMWARE)")
    platform: JsonObject = {}
    strings = spec.guest_oem_strings()
    if strings:
        platform["oem_strings"] = strings
    return {"firmware": firmware}, platform


def build_vm_config(spec: VmSpec, *, firmware: str = "") -> JsonObject:
    """The ``VmConfig`` for ``vm.create``: serial on a socket (the host daemon attaches to it),
    virtio-console off, hybrid vsock for the guest agent, overlay disk, optional TAP, and a
    pvpanic device so a guest panic reaches the event monitor. Firmware boot (``spec.boot_mode``)
    needs ``firmware``; Windows guests get Hyper-V enlightenments (``kvm_hyperv``). CH has no
    CD-ROM: ``spec.cdroms`` are ignored (install Windows under QEMU, see docs/images.md)."""
    paths = ChRuntimePaths(spec.runtime_dir)
    payload, platform = build_payload(spec, firmware=firmware)
    cpus: JsonObject = {"boot_vcpus": spec.vcpus, "max_vcpus": max(spec.vcpus, spec.max_vcpus)}
    if spec.os_type == OS_WINDOWS:
        cpus["kvm_hyperv"] = True
    config: JsonObject = {
        "payload": payload,
        "cpus": cpus,
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
        "pvpanic": True,
    }
    if platform:
        config["platform"] = platform
    hotplug = spec.max_memory_mib - spec.memory_mib
    if hotplug > 0:
        config["memory"]["hotplug_size"] = hotplug * MIB
    if spec.tap:
        net: JsonObject = {"id": "net0", "tap": spec.tap, **_mtu(spec)}
        if spec.mac:
            net["mac"] = spec.mac
        config["net"] = [net]
    for nic in spec.extra_nics:
        config.setdefault("net", []).append({"id": nic.device_id, "tap": nic.tap, "mac": nic.mac, **_mtu(spec)})
    return config


def _mtu(spec: VmSpec) -> JsonObject:
    """``NetConfig.mtu`` where the guest needs less than Ethernet's 1500 (tunnels across hosts);
    left out otherwise, as before (cloud-hypervisor also sets it on the TAP)."""
    return {"mtu": spec.nic_mtu} if spec.nic_mtu != DEFAULT_MTU else {}


def rewrite_snapshot_config(config: JsonObject, spec: VmSpec, *, original_dir: str) -> JsonObject:
    """A snapshot's ``config.json`` made fit for ``spec``: its own serial/vsock sockets, disk
    overlay, CID, TAP and MAC (``spec.mac``; a clone without one gets a MAC derived from its
    id), and every path below the original's runtime directory (hot-added disks, vsock or
    vhost-user sockets...) moved below ``spec``'s. A hot-added NIC keeps its device id; a
    clone needs its own TAP for it in ``spec.extra["tap_<id>"]`` (else ``VmmInvalidRequest``:
    reopening the original's TAP would put both VMs on one interface)."""
    config = json.loads(json.dumps(config))
    here = str(spec.runtime_dir.resolve())
    clone = bool(original_dir) and original_dir != here

    def moved(value: Any) -> Any:
        if isinstance(value, str) and original_dir and value.startswith(original_dir + "/"):
            return here + value[len(original_dir) :]
        if isinstance(value, dict):
            return {k: moved(v) for k, v in value.items()}
        if isinstance(value, list):
            return [moved(v) for v in value]
        return value

    config = moved(config)
    fresh = build_vm_config(spec, firmware=str((config.get("payload") or {}).get("firmware") or ""))
    config["serial"] = fresh["serial"]
    config["console"] = fresh["console"]
    if isinstance(config.get("vsock"), dict):
        config["vsock"]["socket"] = fresh["vsock"]["socket"]
        config["vsock"]["cid"] = spec.vsock_cid
    for disk in config.get("disks") or []:
        if disk.get("id") == "disk0":
            disk["path"] = str(ChRuntimePaths(spec.runtime_dir).overlay)
    for net in config.get("net") or []:
        dev_id = str(net.get("id") or "")
        if dev_id == "net0":
            if spec.tap:
                net["tap"] = spec.tap
            if spec.mac:
                net["mac"] = spec.mac
            elif clone:
                net["mac"] = _derived_mac(spec.vm_id, dev_id)
            continue
        if not clone:
            continue
        tap = spec.extra.get(f"tap_{dev_id}")
        if net.get("tap") and not tap:
            raise VmmInvalidRequest(
                f"the snapshot has a hot-added NIC {dev_id!r} on TAP {net['tap']!r}: "
                f"a clone needs its own TAP for it (spec.extra['tap_{dev_id}'])",
                details={"device": dev_id, "tap": net.get("tap")},
            )
        if tap:
            net["tap"] = tap
        net["mac"] = spec.extra.get(f"mac_{dev_id}") or _derived_mac(spec.vm_id, dev_id)
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
    """``Driver`` for Cloud Hypervisor: one detached ``cloud-hypervisor`` process per VM
    (started, found and killed with ``vms.vmm.process``, like QEMU), driven over its REST
    API socket. Stateless: everything lives in ``spec.runtime_dir``.

    The VMM runs with ``--no-shutdown``: a guest that powers off leaves the VMM up with the
    VM in ``Shutdown`` (``info`` -> ``SHUTDOWN``, reason "guest powered off"), so a power-off
    is told apart from a crash; ``--event-monitor`` events give the reasons (panic, reboot)."""

    name = "cloud-hypervisor"

    def __init__(
        self,
        binary: str = "cloud-hypervisor",
        *,
        qemu_img: str = "qemu-img",
        api_timeout: float = DEFAULT_API_TIMEOUT,
        seccomp: str = "true",
        base_image_format: str = "raw",
        firmware: str = "",
        confinement: VmmConfinement | None = None,
    ) -> None:
        self.binary = binary
        self.firmware = firmware  # CLOUDHV.fd / rust-hypervisor-firmware for firmware boot
        self.qemu_img = qemu_img
        self.api_timeout = api_timeout
        self.seccomp = seccomp
        self.base_image_format = base_image_format
        # User and cgroup of the VMM (SANDBOX_VMM_*; default none: it runs as the caller).
        self.confinement = confinement or VmmConfinement()

    # -- contract extras ------------------------------------------------------------------

    def capabilities(self) -> DriverCapabilities:
        """vCPU/memory hotplug (memory in 128 MiB steps), NIC hotplug, memory snapshots
        (a private copy of the overlay, no shared layers), agent over hybrid vsock."""
        return DriverCapabilities(
            live_resize=True,
            memory_hotplug_step_mib=HOTPLUG_STEP_MIB,
            nic_hotplug=True,
            memory_snapshot=True,
            shared_disk_layers=False,
            agent_transport=AgentTransport.HYBRID_VSOCK,
            live_migration=True,
            live_migration_disk=MIGRATION_DISK_SHARED,
        )

    def version(self) -> str:
        """The binary's version from ``cloud-hypervisor --version`` (e.g. ``v54.0``), or ""."""
        try:
            out = subprocess.run(  # noqa: S603 - argv of our own
                [self.binary, "--version"],
                capture_output=True,
                text=True,
                timeout=10,
                stdin=subprocess.DEVNULL,
                check=False,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
        words = out.split()
        return words[-1] if len(words) >= 2 else ""

    # -- helpers --------------------------------------------------------------------------

    def _client(self, spec: VmSpec, timeout: float | None = None) -> ChApiClient:
        return ChApiClient(ChRuntimePaths(spec.runtime_dir).api_socket, timeout=timeout or self.api_timeout)

    def vmm_pid(self, spec: VmSpec) -> int | None:
        """Pid of this VM's live VMM, or ``None`` (``process.running_vmm_pid``: pid file, alive,
        not a zombie, command line naming the runtime directory)."""
        return running_vmm_pid(spec.runtime_dir)

    def _remove_stale_sockets(self, paths: ChRuntimePaths) -> None:
        # CH does not remove its sockets on exit and fails with "Address already in use".
        for sock in paths.sockets:
            _unlink(sock)

    def _spawn(self, spec: VmSpec) -> int:
        paths = ChRuntimePaths(spec.runtime_dir)
        self._remove_stale_sockets(paths)
        _unlink(paths.hotplugs)
        # No --log-file: CH logs to stderr, which spawn_detached appends to vmm.log.
        argv = [
            self.binary,
            "--api-socket",
            f"path={paths.api_socket}",
            "--event-monitor",
            f"path={paths.events}",
            "--seccomp",
            self.seccomp,
            "--no-shutdown",
        ]
        if (spec.tap or spec.extra_nics) and self.confinement.user:
            # CH opens a TAP by name and brings it up itself (SIOCSIFFLAGS: CAP_NET_ADMIN),
            # which an unprivileged VMM cannot; handing it the TAP as an fd (vm.add-net with
            # SCM_RIGHTS) is not implemented yet. Refuse clearly rather than fail at boot.
            raise VmmUnsupported(
                "cloud-hypervisor cannot open its TAP device as an unprivileged user yet: "
                "run it without a NIC, or set SANDBOX_VMM_USER= (empty) to run VMMs as root",
                details={"tap": spec.tap, "user": self.confinement.user},
            )
        readable: list[Path] = []
        if spec.boot_mode == BOOT_KERNEL:  # firmware boot reads no kernel: the disk carries it
            readable += [spec.kernel, *([spec.initramfs] if spec.initramfs else [])]
        readable += [Path(p) for p in backing_chain(paths.overlay)]
        # Joins its cgroup and drops to the VMM user in the launcher, before exec.
        plan = self.confinement.launch_plan(spec, readable=readable)
        try:
            # The TAP is opened by name: start CH in the namespace that holds it.
            return spawn_detached(argv, spec.runtime_dir, netns=spec.netns, plan=plan)
        except OSError as exc:
            raise VmmError(f"cannot start {self.binary}: {exc}", details={"argv": argv}) from exc

    def _wait_for_api(self, spec: VmSpec, pid: int, timeout: float) -> JsonObject:
        paths = ChRuntimePaths(spec.runtime_dir)
        deadline = time.monotonic() + timeout
        last: VmmError | None = None
        with self._client(spec, timeout=1.0) as api:
            while time.monotonic() < deadline:
                if not pid_is_vmm(pid, spec.runtime_dir):
                    raise VmmError(
                        "cloud-hypervisor exited during start-up",
                        details={"pid": pid, "log": log_tail(spec.runtime_dir, 2000)},
                    )
                if paths.api_socket.exists():
                    try:
                        return api.vmm_ping(timeout=min(1.0, max(0.1, deadline - time.monotonic())))
                    except VmmError as exc:
                        last = exc
                time.sleep(0.05)
        raise VmmTimeout(
            f"cloud-hypervisor API not ready within {timeout:g}s",
            details={"pid": pid, "last_error": repr(last), "log": log_tail(spec.runtime_dir, 2000)},
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

    def _hotplugs_done(self, paths: ChRuntimePaths) -> int:
        try:
            text = paths.hotplugs.read_text().strip()
        except OSError:
            return 0
        return int(text) if text.isdigit() else 0

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
            result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)  # noqa: S603
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise VmmError(f"qemu-img failed: {exc}", details={"argv": argv}) from exc
        if result.returncode != 0:
            raise VmmError(
                "could not create the disk overlay",
                details={"argv": argv, "stderr": result.stderr[-2000:], "returncode": result.returncode},
            )
        os.replace(tmp, paths.overlay)

    def launch(self, spec: VmSpec, *, timeout: float = 30.0) -> LaunchResult:
        """Spawn ``cloud-hypervisor`` detached (``process.spawn_detached``), wait for
        ``vmm.ping``, ``vm.create`` (delete + retry once on failure), ``vm.boot``.

        Idempotent: if this VM's VMM already runs a booted VM, that one is reported; a VM
        the guest powered off (``Shutdown``, the VMM kept by ``--no-shutdown``) boots again."""
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
                    self._create_vm(
                        api,
                        build_vm_config(spec, firmware=self.firmware),
                        timeout=max(1.0, deadline - time.monotonic()),
                    )
                    _write_atomic(paths.hotplugs, "0\n")
                    state = "Created"
                if state in ("Created", "Shutdown"):
                    # Nothing listens on the VM's sockets before boot; files a powered-off
                    # guest left would fail the boot with "Address already in use".
                    _unlink(paths.serial_socket)
                    _unlink(paths.agent_socket)
                    api.vm_boot(timeout=max(1.0, deadline - time.monotonic()))
            except VmmError as exc:
                details = dict(exc.details) if isinstance(exc.details, dict) else {"cause": exc.details}
                details["log"] = log_tail(spec.runtime_dir, 2000)
                raise type(exc)(exc.message, details=details) from exc
        return LaunchResult(pid=pid, driver=self.name, acceleration="kvm", vmm_version=str(ping.get("version", "")))

    def info(self, spec: VmSpec, *, timeout: float = 5.0) -> VmRuntimeInfo:
        """Map ``vm.info``: Created/Running/Paused/Shutdown (BreakPoint -> paused). ``GONE``
        when no VMM runs; ``SHUTDOWN`` when the VMM runs but holds no VM.

        ``reason`` comes from the event monitor (the newest ``RECENT_EVENTS_BYTES`` of it):
        "guest powered off" for a guest-initiated power-off, "guest panic (<event>)" after a
        pvpanic event since the last boot (a panicked guest may still be Running, hung, or
        have rebooted: "...; the guest rebooted")."""
        paths = ChRuntimePaths(spec.runtime_dir)
        pid = self.vmm_pid(spec)
        if pid is None:
            # The VMM died or was stopped: only a panic says something the caller cannot see.
            history = guest_history(read_recent_events(paths.events))
            reason = f"guest panic ({history.panic})" if history.panic else ""
            return VmRuntimeInfo(state=RuntimeState.GONE, pid=None, reason=reason)
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
        reason = ""
        if state in (RuntimeState.RUNNING, RuntimeState.SHUTDOWN, RuntimeState.PAUSED):
            history = guest_history(read_recent_events(paths.events))
            reason = history.reason
            if state is RuntimeState.SHUTDOWN and not reason:
                reason = "guest powered off"
        return VmRuntimeInfo(
            state=state,
            pid=pid,
            vcpus=vcpus if isinstance(vcpus, int) else None,
            memory_mib=mem_bytes // MIB if isinstance(mem_bytes, int) else None,
            raw=data,
            reason=reason,
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
        """Stop the VM and its VMM. Afterwards no VMM runs and its sockets are removed.

        - ``force``: kill the VMM at once (SIGTERM, then SIGKILL).
        - Running: ACPI power button, wait up to ``graceful_timeout`` for the guest to power
          off (state ``Shutdown`` with ``--no-shutdown``, or the VMM exits).
        - Paused: resumed first, then the power button as above: a button pressed on stopped
          vCPUs is never seen, and a clean guest shutdown keeps its disk consistent.
        - Created (never booted), Shutdown or no VM: nothing to ask the guest (CH refuses
          the power button there).
        Then ``vmm.shutdown``, then SIGTERM/SIGKILL (``process.kill_vmm``)."""
        paths = ChRuntimePaths(spec.runtime_dir)
        pid = self.vmm_pid(spec)
        if pid is not None and not force:
            with self._client(spec, min(self.api_timeout, 5.0)) as api:
                try:
                    state: str | None = str(api.vm_info().get("state"))
                except VmmError:
                    state = None
                if state == "Paused":
                    try:
                        api.vm_resume()
                        state = "Running"
                    except VmmError:
                        state = None
                pressed = False
                if state == "Running":
                    try:
                        api.vm_power_button()
                        pressed = True
                    except VmmError:
                        pressed = False

                def powered_off() -> bool:
                    if not pid_is_vmm(pid, spec.runtime_dir):
                        return True
                    try:
                        return str(api.vm_info(timeout=1.0).get("state")) in ("Shutdown", "Created")
                    except VmmError:
                        return not pid_is_vmm(pid, spec.runtime_dir)

                if pressed:
                    _wait_until(powered_off, graceful_timeout, interval=0.1)
                if pid_is_vmm(pid, spec.runtime_dir):
                    with contextlib.suppress(VmmError):
                        api.vmm_shutdown(timeout=5.0)
            wait_pid_exit(pid, spec.runtime_dir, 5.0)
        if pid is not None:
            try:
                kill_vmm(pid, spec.runtime_dir)
            except VmmTimeout as exc:
                raise VmmError("cloud-hypervisor did not die after SIGKILL", details={"pid": pid}) from exc
        self._remove_stale_sockets(paths)
        _unlink(paths.pid_file)
        if pid is not None:
            self.confinement.cgroup_remove(spec)

    def resize(self, spec: VmSpec, *, vcpus: int | None, memory_mib: int | None, timeout: float = 10.0) -> None:
        """``vm.resize``, validated first against what the running VMM allows (``vm.info``,
        not ``spec``): vCPUs within 1..``max_vcpus``; memory not below the current size
        (ACPI hotplug only grows; CH would silently ignore a shrink), at most ``size +
        hotplug_size``, grown by a multiple of 128 MiB, and at most 8 hot-adds per VMM.
        A request outside those raises ``VmmInvalidRequest`` (nothing is changed). New
        vCPUs must be onlined by the guest."""
        if vcpus is None and memory_mib is None:
            return
        paths = ChRuntimePaths(spec.runtime_dir)
        self._require_pid(spec)
        with self._client(spec, timeout) as api:
            data = api.vm_info()
            config = data.get("config") or {}
            cpus = config.get("cpus") or {}
            memory = config.get("memory") or {}
            current_vcpus = int(cpus.get("boot_vcpus") or 1)
            max_vcpus = int(cpus.get("max_vcpus") or current_vcpus)
            if vcpus == current_vcpus:
                vcpus = None
            if vcpus is not None and not 1 <= vcpus <= max_vcpus:
                raise VmmInvalidRequest(
                    f"{vcpus} vCPUs is outside 1..{max_vcpus}, the range this VM was started with; "
                    "stop the VM to change its maximum",
                    details={"vcpus": vcpus, "max_vcpus": max_vcpus},
                )
            ram: int | None = None
            if memory_mib is not None:
                size = int(memory.get("size") or 0)
                actual = data.get("memory_actual_size")
                current = actual if isinstance(actual, int) else size + int(memory.get("hotplugged_size") or 0)
                limit = size + int(memory.get("hotplug_size") or 0)
                wanted = memory_mib * MIB
                step = HOTPLUG_STEP_MIB * MIB
                if wanted < current:
                    raise VmmInvalidRequest(
                        f"memory cannot shrink while the VM runs ({memory_mib} MiB < {current // MIB} MiB): "
                        "stop the VM to lower it",
                        details={"memory_mib": memory_mib, "current_mib": current // MIB},
                    )
                if wanted > limit:
                    raise VmmInvalidRequest(
                        f"{memory_mib} MiB is above the {limit // MIB} MiB this VM can grow to while running; "
                        "stop the VM to raise its maximum",
                        details={"memory_mib": memory_mib, "max_memory_mib": limit // MIB},
                    )
                if wanted > current:
                    if (wanted - current) % step:
                        raise VmmInvalidRequest(
                            f"memory grows in steps of {HOTPLUG_STEP_MIB} MiB while the VM runs: "
                            f"{memory_mib} MiB is {(wanted - current) // MIB} MiB above the current "
                            f"{current // MIB} MiB",
                            details={"memory_mib": memory_mib, "current_mib": current // MIB, "step_mib": 128},
                        )
                    if self._hotplugs_done(paths) >= HOTPLUG_SLOTS:
                        raise VmmInvalidRequest(
                            f"this VM's memory was already grown {HOTPLUG_SLOTS} times, the most "
                            "cloud-hypervisor allows while it runs: stop and start it to grow again",
                            details={"hotplugs": HOTPLUG_SLOTS},
                        )
                    ram = wanted
            if vcpus is None and ram is None:
                return
            api.vm_resize(desired_vcpus=vcpus, desired_ram=ram)
            if ram is not None:
                _write_atomic(paths.hotplugs, f"{self._hotplugs_done(paths) + 1}\n")

    def nic_add(self, spec: VmSpec, nic: NicDevice, *, timeout: float = 10.0) -> None:
        """``PUT vm.add-net`` with the NIC's device id, TAP (opened by name, as at boot) and MAC."""
        if self.confinement.user:
            raise VmmUnsupported(
                "cloud-hypervisor cannot open a TAP device as an unprivileged user yet",
                details={"tap": nic.tap, "user": self.confinement.user},
            )
        self._require_pid(spec)
        with self._client(spec, timeout) as api:
            api.vm_add_net({"id": nic.device_id, "tap": nic.tap, "mac": nic.mac, **_mtu(spec)}, timeout=timeout)

    def nic_remove(self, spec: VmSpec, device_id: str, *, timeout: float = 10.0) -> None:
        """``PUT vm.remove-device`` of the NIC ``device_id``."""
        self._require_pid(spec)
        with self._client(spec, timeout) as api:
            api.vm_remove_device(device_id, timeout=timeout)

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

    def snapshot(
        self, spec: VmSpec, dest_dir: Path, *, include_memory: bool = True, timeout: float = 300.0
    ) -> SnapshotMeta:
        """Snapshot ``spec`` into ``dest_dir``; writes and returns ``snapshot.json``.

        With memory (the VM must be Running or Paused): pause -> ``vm.snapshot`` (CH's
        ``config.json``, ``state.json``, ``memory-ranges``) -> copy of the overlay and of any
        hot-added disk inside the runtime directory, while still paused, so disk and memory
        agree -> resume (only if it was running).

        Disk only (``include_memory=False``): CH cannot leave memory out of ``vm.snapshot``,
        so no ``vm.snapshot`` is taken: a running VM is paused just for the overlay copy (a
        crash-consistent disk), a stopped one (no VMM, or a VM not running) is copied as it is;
        restoring it boots the copy. A memory snapshot of a stopped VM raises
        ``VmmStateError``. CH shares no disk layers: every snapshot holds a private copy."""
        started = time.monotonic()
        paths = ChRuntimePaths(spec.runtime_dir)
        dest_dir = dest_dir.resolve()
        dest_dir.mkdir(parents=True, exist_ok=True)
        if not paths.overlay.is_file():
            raise VmmError("the VM has no disk overlay to snapshot", details={"path": str(paths.overlay)})
        pid = self.vmm_pid(spec)
        pause_ms = 0
        vcpus, memory_mib = spec.vcpus, spec.memory_mib
        extra_disks: dict[str, str] = {}
        if pid is None:
            if include_memory:
                raise VmmStateError("a memory snapshot needs a running VM; take a disk-only snapshot instead")
            version = self.version()
            _copy_file(paths.overlay, dest_dir / SNAPSHOT_OVERLAY)
        else:
            with self._client(spec, min(timeout, 30.0)) as api:
                version = str(api.vmm_ping().get("version", ""))
                data = api.vm_info()
                state = str(data.get("state"))
                config = data.get("config") or {}
                vcpus = int((config.get("cpus") or {}).get("boot_vcpus") or vcpus)
                actual = data.get("memory_actual_size")
                memory_mib = actual // MIB if isinstance(actual, int) else memory_mib
                live = state in ("Running", "Paused")
                if include_memory and not live:
                    raise VmmStateError(
                        f"cannot snapshot the memory of a VM in state {state}", details={"state": state}
                    )
                was_running = state == "Running"
                paused_at = time.monotonic()
                if was_running:
                    api.vm_pause()
                try:
                    if include_memory:
                        # CH writes the snapshot itself, as the VMM user; afterwards it is
                        # given back to root (no VMM may change a snapshot; clones read it).
                        self.confinement.give(dest_dir)
                        try:
                            api.vm_snapshot(_file_url(dest_dir), timeout=timeout)
                        finally:
                            self.confinement.reclaim(dest_dir)
                    _copy_file(paths.overlay, dest_dir / SNAPSHOT_OVERLAY)
                    extra_disks = self._copy_extra_disks(config, paths, dest_dir)
                except BaseException:
                    for name in (*_CH_SNAPSHOT_FILES, SNAPSHOT_OVERLAY, *extra_disks.values()):
                        _unlink(dest_dir / name)
                    raise
                finally:
                    if was_running:
                        api.vm_resume()
                    pause_ms = int((time.monotonic() - paused_at) * 1000) if was_running else 0
        meta = SnapshotMeta(
            driver=self.name,
            vmm_version=version,
            vm_id=spec.vm_id,
            include_memory=include_memory,
            vcpus=vcpus,
            memory_mib=memory_mib,
            disk_gib=spec.disk_gib,
            acceleration="kvm",
            disk_layer=SNAPSHOT_OVERLAY,
            state_file=SNAPSHOT_STATE if include_memory else None,
            backing_chain=[],
            pause_ms=pause_ms,
            total_ms=int((time.monotonic() - started) * 1000),
            created_unix=time.time(),
            extra={
                "runtime_dir": str(spec.runtime_dir.resolve()),
                "memory_hotplugs": self._hotplugs_done(paths) if include_memory else 0,
                "extra_disks": extra_disks,
            },
        )
        meta.write(dest_dir)
        return meta

    @staticmethod
    def _copy_extra_disks(config: JsonObject, paths: ChRuntimePaths, dest_dir: Path) -> dict[str, str]:
        """Copy hot-added disks that live in the runtime directory (a clone gets its own copy
        at the same relative place); returns ``{relative path: snapshot file name}``."""
        root = str(paths.root.resolve())
        copied: dict[str, str] = {}
        for disk in config.get("disks") or []:
            path = str(disk.get("path") or "")
            if disk.get("id") == "disk0" or not path.startswith(root + "/"):
                continue
            relative = path[len(root) + 1 :]
            name = f"disk-{len(copied)}-{Path(relative).name}"
            _copy_file(Path(path), dest_dir / name)
            copied[relative] = name
        return copied

    def restore(self, spec: VmSpec, src_dir: Path, *, timeout: float = 120.0) -> LaunchResult:
        """Start ``spec`` from the snapshot in ``src_dir`` (verify its manifest first).

        ``spec`` may be another VM (a clone): it gets its own identity. The snapshot's
        overlay copy (and hot-added disks) are copied into ``spec``'s runtime directory; a
        memory snapshot's ``config.json`` is rewritten for ``spec`` in a staging copy
        (``rewrite_snapshot_config``: sockets, overlay, CID, TAP, MAC, hot-added devices'
        paths; the big files are symlinked), restored into a fresh VMM (``vm.restore``)
        and resumed. A disk-only snapshot boots ``spec`` on the copied disk.
        ``VmmStateError`` when a VMM already runs for ``spec``; ``VmmError`` for a snapshot
        of another driver or of another cloud-hypervisor version (not portable)."""
        paths = ChRuntimePaths(spec.runtime_dir)
        src_dir = src_dir.resolve()
        meta = SnapshotMeta.read(src_dir)
        if meta.driver != self.name:
            raise VmmError(f"this snapshot was taken by {meta.driver}, not {self.name}")
        _check_socket_paths(paths)
        if self.vmm_pid(spec) is not None:
            raise VmmStateError("a VMM already runs for this VM; restore needs a fresh one", details={})
        config: JsonObject | None = None
        if meta.include_memory:
            here = self.version()
            if meta.vmm_version and here and _version_key(meta.vmm_version) != _version_key(here):
                raise VmmError(
                    f"snapshot taken with cloud-hypervisor {meta.vmm_version}, this host runs {here}",
                    details={"snapshot": meta.vmm_version, "host": here},
                )
            try:
                config = json.loads((src_dir / SNAPSHOT_CONFIG).read_text())
            except (OSError, ValueError) as exc:
                raise VmmError(f"not a cloud-hypervisor snapshot: {src_dir}", details={"cause": repr(exc)}) from exc
            config = rewrite_snapshot_config(config, spec, original_dir=str(meta.extra.get("runtime_dir") or ""))
        paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_atomic(paths.spec_file, spec.to_json())
        layer = src_dir / (meta.disk_layer or SNAPSHOT_OVERLAY)
        if not layer.is_file():
            raise VmmError("the snapshot's disk copy is missing", details={"path": str(layer)})
        _copy_file(layer, paths.overlay)
        for relative, name in dict(meta.extra.get("extra_disks") or {}).items():
            target = (paths.root / relative).resolve()
            if not str(target).startswith(str(paths.root.resolve()) + "/"):
                raise VmmError("the snapshot names a disk outside the runtime directory", details={"disk": relative})
            target.parent.mkdir(parents=True, exist_ok=True)
            _copy_file(src_dir / name, target)
        if config is None:
            return self.launch(spec, timeout=timeout)

        staging = paths.root / "restore"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for entry in src_dir.iterdir():
            if entry.name in _CH_SNAPSHOT_FILES and entry.name != SNAPSHOT_CONFIG:
                (staging / entry.name).symlink_to(entry)
        _write_atomic(staging / SNAPSHOT_CONFIG, json.dumps(config))

        deadline = time.monotonic() + timeout
        pid = self._spawn(spec)
        try:
            ping = self._wait_for_api(spec, pid, min(30.0, timeout))
            with self._client(spec, max(1.0, deadline - time.monotonic())) as api:
                api.vm_restore(_file_url(staging))
                _write_atomic(paths.hotplugs, f"{int(meta.extra.get('memory_hotplugs') or 0)}\n")
                api.vm_resume()
        except VmmError as exc:
            self.shutdown(spec, force=True)
            if isinstance(exc.details, dict):
                exc.details.setdefault("log", log_tail(spec.runtime_dir, 2000))
            raise
        return LaunchResult(pid=pid, driver=self.name, acceleration="kvm", vmm_version=str(ping.get("version", "")))

    # -- live migration -------------------------------------------------------------------
    # Cloud Hypervisor sends RAM and device state only, and the target recreates the VM from
    # the source's own config: the same runtime directory path (sockets, overlay), the same
    # TAP names, and the disk already at that path (``live_migration_disk == "shared"``).

    def migrate_receive_prepare(
        self,
        spec: VmSpec,
        *,
        listen_host: str,
        backing: Path | None = None,
        tls: MigrationTls | None = None,
        timeout: float = 60.0,
    ) -> MigrationTarget:
        """Target host: start an empty VMM for ``spec`` and ``vm.receive-migration`` on
        ``listen_host`` (a free port picked in ``spec.netns``; retried when it was taken
        meanwhile). The VM's overlay must already be in ``spec.runtime_dir`` (shared storage or
        a copy): ``VmmError`` otherwise. ``backing`` is unused (no layers move). ``tls``
        (Cloud Hypervisor's ``tls_dir``) is not wired yet: ``VmmUnsupported``."""
        if tls is not None:
            raise VmmUnsupported("migration over TLS is not wired for cloud-hypervisor yet")
        paths = ChRuntimePaths(spec.runtime_dir)
        if self.vmm_pid(spec) is not None:
            raise VmmStateError("a VMM already runs for this VM on the target host")
        listen_address_check(listen_host)
        _check_socket_paths(paths)
        if not paths.overlay.is_file():
            raise VmmError(
                "cloud-hypervisor does not copy disks: the VM's disk must already be on the target host",
                details={"path": str(paths.overlay)},
            )
        deadline = time.monotonic() + timeout
        _write_atomic(paths.spec_file, spec.to_json())
        pid = self._spawn(spec)
        port = 0
        try:
            ping = self._wait_for_api(spec, pid, max(0.5, deadline - time.monotonic()))
            for attempt in range(3):
                probe = call_in_netns(spec.netns, listening_socket, listen_host)
                port = int(probe.getsockname()[1])
                probe.close()
                with self._client(spec) as api:
                    try:
                        answered = api.vm_receive_migration(
                            f"tcp:{uri_host(listen_host)}:{port}", answer_within=RECEIVE_ANSWER_SECONDS
                        )
                    except VmmError as exc:
                        if attempt < 2 and "in use" in json.dumps(exc.details).lower():
                            continue  # someone took the port between probe and bind
                        raise
                if answered:
                    raise VmmError("cloud-hypervisor answered vm.receive-migration before any sender connected")
                break
        except BaseException:
            self.shutdown(spec, force=True)
            raise
        return MigrationTarget(
            driver=self.name,
            host=listen_host,
            port=port,
            acceleration="kvm",
            vmm_version=str(ping.get("version", "")),
            runtime_dir=str(spec.runtime_dir.resolve()),
        )

    def migrate_send(
        self,
        spec: VmSpec,
        target: MigrationTarget,
        *,
        tls: MigrationTls | None = None,
        timeout: float = 600.0,
        downtime_ms: int = 500,
    ) -> MigrationResult:
        """Source host: ``vm.send-migration`` to ``tcp:<target.host>:<target.port>`` (bounded
        by ``timeout`` in the VMM, ``Cancel`` strategy, and here). On success the source VMM
        exits by itself; on failure Cloud Hypervisor resumes the VM here and the error is
        raised. The target must use the same runtime directory path. No ``tls`` yet."""
        if tls is not None or target.tls:
            raise VmmUnsupported("migration over TLS is not wired for cloud-hypervisor yet")
        started = time.monotonic()
        if target.driver != self.name:
            raise VmmError(f"the target host prepared a {target.driver} VM, not {self.name}")
        if target.runtime_dir and target.runtime_dir != str(spec.runtime_dir.resolve()):
            raise VmmError(
                "cloud-hypervisor recreates the VM at the same paths: the runtime directories differ",
                details={"source": str(spec.runtime_dir.resolve()), "target": target.runtime_dir},
            )
        self._require_pid(spec)
        with self._client(spec, timeout + SEND_MARGIN_SECONDS) as api:
            state = str(api.vm_info(timeout=self.api_timeout).get("state"))
            if state != "Running":
                raise VmmStateError(f"cannot migrate a VM in state {state}", details={"state": state})
            here = str(api.vmm_ping(timeout=self.api_timeout).get("version", ""))
            if target.vmm_version and here and _version_key(target.vmm_version) != _version_key(here):
                raise VmmError(f"this host runs cloud-hypervisor {here}, the target {target.vmm_version}")
            api.vm_send_migration(
                f"tcp:{uri_host(target.host)}:{target.port}",
                downtime_ms=downtime_ms,
                timeout_s=max(1, int(timeout)),
                timeout=timeout + SEND_MARGIN_SECONDS,
            )
        total_ms = int((time.monotonic() - started) * 1000)
        return MigrationResult(total_ms=total_ms, downtime_ms=0, ram_bytes=0, disk_bytes=0, disk_sync="shared")

    def migrate_receive_finish(self, spec: VmSpec, *, timeout: float = 60.0) -> None:
        """Target host: wait until the received VM runs (Cloud Hypervisor resumes it itself;
        a paused one is resumed). The API answers nothing while a migration is received, so
        each look is short. ``VmmError`` when the VMM died or holds no VM (the receive failed)."""
        deadline = time.monotonic() + timeout
        pid = self._require_pid(spec)
        with self._client(spec, 2.0) as api:
            while True:
                if not pid_is_vmm(pid, spec.runtime_dir):
                    raise VmmError("the receiving cloud-hypervisor exited", details={"log": log_tail(spec.runtime_dir)})
                state: str | None = None
                try:
                    state = str(api.vm_info(timeout=2.0).get("state"))
                except VmmTimeout:
                    pass  # still receiving
                except VmmStateError as exc:
                    raise VmmError("the migration was not received on the target host", details=exc.details) from exc
                if state == "Paused":
                    api.vm_resume()
                    return
                if state == "Running":
                    return
                if time.monotonic() > deadline:
                    raise VmmTimeout("the migrated VM did not start on the target host", details={"state": state})
                time.sleep(0.1)

    def migrate_cancel(self, spec: VmSpec, *, timeout: float = 30.0) -> None:
        """Nothing to do: Cloud Hypervisor has no cancel call and resumes the VM itself when
        a send fails or reaches its ``timeout_s``; after a successful send the source VMM is
        gone (the VM lives on the target)."""

    def migrate_receive_abort(self, spec: VmSpec) -> None:
        """Target host: kill the receiving VMM and remove its sockets and pid file. The
        runtime directory and the overlay stay: with shared storage that is the VM's disk."""
        self.shutdown(spec, force=True)


def _copy_file(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` through a temporary name (readers never see a partial file)."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        shutil.copyfile(src, tmp)
    except OSError as exc:
        _unlink(tmp)
        raise VmmError(f"cannot copy {src.name}: {exc}", details={"src": str(src), "dest": str(dest)}) from exc
    os.replace(tmp, dest)


if TYPE_CHECKING:
    # mypy checks that the driver satisfies the whole Driver protocol.
    _conforms: Driver = CloudHypervisorDriver()
