"""Multi-request logic written once for the sync and the async client.

A flow is a generator that yields steps (``Call`` an endpoint, ``Sleep``, ``Notify`` a
callback, ``Emit`` an item to an iterator) and receives each step's result; ``run_sync`` /
``run_async`` execute it with the blocking or the asyncio transport, and ``iter_sync`` /
``iter_async`` turn the ``Emit`` steps into an iterator. Errors of a step are thrown into the
flow, which may handle them (e.g. retry a read from the same offset).
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import inspect
import json
import time
import uuid
from collections.abc import AsyncIterator, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

from msbx.errors import (
    ApiError,
    NotFound,
    OperationFailed,
    SandboxError,
    ServiceUnavailable,
    Timeout,
    TransportError,
)

# Operation statuses that are final; anything else (queued, running, states a newer server
# adds) means "not yet".
OPERATION_DONE = frozenset({"succeeded", "failed", "cancelled"})
# VM states that end a wait for "running" with an error.
VM_FAILED = frozenset({"error"})


@dataclass
class Call:
    name: str
    path: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] | None = None
    json: dict[str, Any] | None = None
    timeout: float | None = None


@dataclass
class Sleep:
    seconds: float


@dataclass
class Notify:
    callback: Callable[..., Any]
    args: tuple


@dataclass
class Emit:
    item: Any


Flow = Generator[Any, Any, Any]


def run_sync(http: Any, flow: Flow) -> Any:
    box: list[Any] = [None]
    for _ in iter_sync(http, flow, emit=False, result=box):
        pass
    return box[0]


def iter_sync(http: Any, flow: Flow, *, emit: bool = True, result: list[Any] | None = None) -> Iterator[Any]:
    """Run ``flow``; yield what it emits; its return value goes to ``result[0]``."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = flow.throw(error) if error is not None else flow.send(value)
        except StopIteration as stop:
            if result is not None:
                result[0] = stop.value
            return
        value, error = None, None
        try:
            if isinstance(step, Call):
                value = http.json(step.name, path=step.path, params=step.params, json=step.json, timeout=step.timeout)
            elif isinstance(step, Sleep):
                time.sleep(step.seconds)
            elif isinstance(step, Notify):
                step.callback(*step.args)
            elif isinstance(step, Emit):
                if emit:
                    yield step.item
            else:  # pragma: no cover - a bug in a flow
                raise TypeError(f"unknown step {step!r}")
        except (SandboxError, OSError) as exc:
            error = exc


async def run_async(http: Any, flow: Flow) -> Any:
    box: list[Any] = [None]
    async for _ in iter_async(http, flow, emit=False, result=box):
        pass
    return box[0]


async def iter_async(
    http: Any, flow: Flow, *, emit: bool = True, result: list[Any] | None = None
) -> AsyncIterator[Any]:
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = flow.throw(error) if error is not None else flow.send(value)
        except StopIteration as stop:
            if result is not None:
                result[0] = stop.value
            return
        value, error = None, None
        try:
            if isinstance(step, Call):
                value = await http.json(
                    step.name, path=step.path, params=step.params, json=step.json, timeout=step.timeout
                )
            elif isinstance(step, Sleep):
                await asyncio.sleep(step.seconds)
            elif isinstance(step, Notify):
                outcome = step.callback(*step.args)
                if inspect.isawaitable(outcome):
                    await outcome
            elif isinstance(step, Emit):
                if emit:
                    yield step.item
            else:  # pragma: no cover
                raise TypeError(f"unknown step {step!r}")
        except (SandboxError, OSError) as exc:
            error = exc


class _Deadline:
    def __init__(self, timeout: float | None) -> None:
        self.end = None if timeout is None else time.monotonic() + timeout

    def left(self) -> float | None:
        return None if self.end is None else self.end - time.monotonic()

    def expired(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end


def _poll_delay(idle_rounds: int, base: float, cap: float) -> float:
    return min(cap, base * (1.5**idle_rounds))


def operation_wait(
    op_id: str,
    *,
    timeout: float | None,
    poll: float = 0.5,
    on_progress: Callable[[dict[str, Any]], Any] | None = None,
    raise_on_failure: bool = True,
) -> Flow:
    """Poll an operation until it is final; ``on_progress(op)`` on every change of status or
    progress. Transient errors (no answer, 503) are retried until the deadline."""
    deadline = _Deadline(timeout)
    seen = None
    idle = 0
    op: dict[str, Any] = {}
    while True:
        try:
            op = yield Call("operation_get", {"id": op_id})
        except (TransportError, ServiceUnavailable):
            if deadline.expired():
                raise
            yield Sleep(poll)
            continue
        key = (op.get("status"), op.get("progress"), len(op.get("log") or ""))
        if key != seen:
            seen, idle = key, 0
            if on_progress is not None:
                yield Notify(on_progress, (op,))
        else:
            idle += 1
        if op.get("status") in OPERATION_DONE:
            if op.get("status") != "succeeded" and raise_on_failure:
                raise OperationFailed(
                    f"operation {op.get('action')} {op_id} {op.get('status')}: {op.get('error') or 'no error text'}", op
                )
            return op
        if deadline.expired():
            raise Timeout(f"operation {op_id} not finished after {timeout} s (status {op.get('status')})")
        yield Sleep(_poll_delay(idle, poll, max(poll, 2.0)))


def vm_wait_state(vm_id: str, states: set[str], *, timeout: float | None, poll: float = 0.5) -> Flow:
    """Poll a VM until its state is one of ``states`` (``"gone"``: deleted). Transitional
    states the SDK does not know (a newer server's) just mean "keep waiting"."""
    deadline = _Deadline(timeout)
    vm: dict[str, Any] = {}
    while True:
        try:
            vm = yield Call("vm_get", {"id": vm_id})
        except ApiError as exc:
            if exc.status == 404 and "gone" in states:
                return {"id": vm_id, "state": "gone"}
            if exc.status != 503:
                raise
        except TransportError:
            if deadline.expired():
                raise
        else:
            if vm.get("state") in states:
                return vm
            if vm.get("state") in VM_FAILED and not (states & VM_FAILED):
                raise OperationFailed(f"VM {vm_id} is in state error: {vm.get('last_error') or ''}".strip(), vm)
        if deadline.expired():
            raise Timeout(f"VM {vm_id} did not reach {sorted(states)} in {timeout} s (state {vm.get('state')})")
        yield Sleep(poll)


def is_vm_id(ref: str) -> bool:
    """Whether ``ref`` is a VM id (a UUID) rather than a name."""
    try:
        uuid.UUID(ref)
    except ValueError:
        return False
    return True


def console_ack_every(window: int) -> int:
    """Console bytes to receive between two acks: a quarter of the server's flow-control
    window (its ``hello``), so three quarters are still in flight when the ack leaves and the
    stream never waits for it on a fast link (docs/dashboard.md)."""
    return max(1, window // 4)


class ExecWindow:
    """The client's side of an exec websocket's flow control (docs/exec-and-files.md): the
    server sends at most ``window`` output bytes beyond the offset last acknowledged, so a
    reader acknowledges as it reads (every quarter window, as the console does) or the stream
    stops for good once a window of output went unacknowledged."""

    def __init__(self) -> None:
        self.offset = 0  # output bytes received (exec offsets)
        self.acked = 0
        self.window = 256 << 10  # the server's, from ``attached``

    def control(self, message: str) -> dict[str, Any]:
        """A JSON control frame, its flow-control part applied (``attached``: where the stream
        starts and the window; ``gap``: bytes the bounded buffer dropped, which the server counts
        as sent and acknowledged); the frame, for the caller's part (``exit``, ``error``)."""
        control = json.loads(message)
        kind = control.get("type")
        if kind == "attached":
            self.offset = self.acked = int(control.get("offset") or 0)
            self.window = int(control.get("window") or self.window)
        elif kind == "gap":
            self.offset = max(self.offset, int(control.get("to") or 0))
            self.acked = max(self.acked, self.offset)
        return control

    def received(self, size: int) -> str | None:
        """Count ``size`` output bytes; the ack frame to send now, if one is due."""
        self.offset += size
        if self.offset - self.acked < console_ack_every(self.window):
            return None
        self.acked = self.offset
        return json.dumps({"type": "ack", "offset": self.offset})


_STREAMS = {b"\x01": "stdout", b"\x02": "stderr", b"\x03": "pty"}


class ExecSocketReader:
    """The client's side of an exec websocket that starts its command (``/ws/vms/{id}/exec/``),
    without I/O: ``take`` each server frame and send back the frames it returns (acks), call the
    callbacks it returns (output as text, in order); ``result`` is set once the command exited.
    Until the server's ``started`` an ``error`` frame raises the REST call's exception."""

    def __init__(self, path: str, on_stdout: Callable | None = None, on_stderr: Callable | None = None) -> None:
        self.path = path
        self.sink = TextSink(on_stdout, on_stderr)
        self.flow = ExecWindow()
        self.exec_id: str | None = None
        self.result: dict[str, Any] | None = None
        self.lost: dict[str, Any] | None = None  # an ``error`` after the start: go on over REST

    def take(self, message: str | bytes) -> tuple[list[str], list[Notify]]:
        from msbx._http import ws_start_reply

        if self.exec_id is None:
            self.exec_id = ws_start_reply(message, self.path)
            return [], []
        if isinstance(message, bytes):
            data = message[1:]
            chunk = OutputChunk(_STREAMS.get(message[:1], "stdout"), self.flow.offset, data)
            ack = self.flow.received(len(data))
            return ([ack] if ack is not None else []), self.sink.feed(chunk)
        control = self.flow.control(message)
        kind = control.get("type")
        if kind == "exit":
            self.result = control.get("result") or {}
            return [], self.sink.finish()
        elif kind == "error":  # after the start: the socket (or hostd's stream) is lost, not the command
            self.lost = control
        return [], []

    def texts(self) -> dict[str, str]:
        """The output so far, as text per stream (``exec_collect``'s ``prefix`` when the rest is
        read over HTTP)."""
        return {"stdout": self.sink.text("stdout"), "stderr": self.sink.text("stderr")}


def vm_named(name: str, rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The one VM called exactly ``name`` among ``rows`` (the list's ``?name=`` answer, which
    matches substrings): NotFound when none, SandboxError when several VMs you can see (yours
    and shared ones) have that name."""
    matches = [row for row in rows if row.get("name") == name]
    if len(matches) > 1:
        raise SandboxError(f"{len(matches)} VMs are named {name!r}: use the id")
    if not matches:
        raise NotFound(f"no VM {name!r}", status=404)
    return matches[0]


@dataclass
class OutputChunk:
    """Bytes an exec wrote: ``stream`` is stdout, stderr or pty; ``offset`` is the position of
    the first byte in the exec's output (stdout and stderr share one offset space)."""

    stream: str
    offset: int
    data: bytes


def exec_follow(
    vm_id: str,
    exec_id: str,
    *,
    offset: int = 0,
    follow: bool = True,
    timeout: float | None = None,
    poll: float = 0.05,
    max_poll: float = 1.0,
) -> Flow:
    """Emit ``OutputChunk`` from ``offset`` on; return ``(result, end_offset, gaps)`` once the
    exec ended and everything was read (or when ``follow`` is False, once caught up).

    A dropped connection or a 503 is retried from the same offset (the guest keeps the
    output in its bounded buffer), so an iterator survives restarts of the web process."""
    deadline = _Deadline(timeout)
    idle = 0
    failures = 0
    gaps: list[Any] = []
    while True:
        try:
            page = yield Call(
                "exec_output",
                {"id": vm_id, "exec_id": exec_id},
                params={"offset": offset, "encoding": "base64"},
            )
        except (TransportError, ServiceUnavailable):
            failures += 1
            if deadline.expired() or failures > 60:
                raise
            yield Sleep(min(2.0, 0.1 * failures))
            continue
        failures = 0
        if page.get("gap"):
            gaps.append((offset, page.get("offset")))
        got = False
        for chunk in page.get("chunks") or ():
            data = base64.b64decode(chunk.get("data") or "")
            if data:
                got = True
                yield Emit(OutputChunk(chunk.get("stream") or "stdout", int(chunk.get("offset", offset)), data))
        offset = int(page.get("next_offset", offset))
        end = page.get("end_offset")
        caught_up = end is None or offset >= int(end)
        if caught_up and not page.get("running") and page.get("result") is not None:
            return page.get("result"), offset, gaps
        if caught_up and not follow:
            return None, offset, gaps
        if got and not caught_up:
            idle = 0
            continue
        if deadline.expired():
            raise Timeout(f"exec {exec_id} still running after {timeout} s")
        idle = 0 if got else idle + 1
        yield Sleep(_poll_delay(idle, poll, max_poll))


class TextSink:
    """Collects an exec's output per stream and calls ``on_stdout``/``on_stderr`` with text
    decoded incrementally (a UTF-8 sequence split across chunks is decoded whole)."""

    def __init__(self, on_stdout: Callable | None = None, on_stderr: Callable | None = None) -> None:
        self.callbacks = {"stdout": on_stdout, "stderr": on_stderr, "pty": on_stdout}
        self.decoders: dict[str, Any] = {}
        self.parts: dict[str, list[str]] = {"stdout": [], "stderr": []}

    def feed(self, chunk: OutputChunk) -> list[Notify]:
        stream = "stderr" if chunk.stream == "stderr" else "stdout"
        decoder = self.decoders.setdefault(stream, codecs.getincrementaldecoder("utf-8")("replace"))
        text = decoder.decode(chunk.data)
        return self._deliver(stream, chunk.stream, text)

    def finish(self) -> list[Notify]:
        out: list[Notify] = []
        for stream, decoder in self.decoders.items():
            out += self._deliver(stream, stream, decoder.decode(b"", final=True))
        return out

    def _deliver(self, stream: str, raw_stream: str, text: str) -> list[Notify]:
        if not text:
            return []
        self.parts[stream].append(text)
        callback = self.callbacks.get(raw_stream)
        return [Notify(callback, (text,))] if callback is not None else []

    def text(self, stream: str) -> str:
        return "".join(self.parts[stream])


def exec_collect(
    vm_id: str,
    exec_id: str,
    *,
    offset: int = 0,
    timeout: float | None = None,
    on_stdout: Callable | None = None,
    on_stderr: Callable | None = None,
    prefix: dict[str, str] | None = None,
) -> Flow:
    """Follow an exec to its end, streaming to the callbacks; return (result, stdout, stderr)."""
    sink = TextSink(on_stdout, on_stderr)
    inner = exec_follow(vm_id, exec_id, offset=offset, timeout=timeout)
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = inner.throw(error) if error is not None else inner.send(value)
        except StopIteration as stop:
            result = stop.value[0]
            break
        value, error = None, None
        if isinstance(step, Emit):
            for notify in sink.feed(step.item):
                yield notify
            continue
        try:
            value = yield step
        except (SandboxError, OSError) as exc:
            error = exc
    for notify in sink.finish():
        yield notify
    prefix = prefix or {}
    return result, prefix.get("stdout", "") + sink.text("stdout"), prefix.get("stderr", "") + sink.text("stderr")
