"""Plain results shared by the sync and async clients."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TRANSFER_CHUNK = 256 << 10


@dataclass
class ExecResult:
    """How a command ended. ``exit_code`` is None when a signal ended it (``signal``, e.g.
    ``"SIGKILL"``) or when it is still running (``running``, after the server's wait limit)."""

    exec_id: str
    exit_code: int | None
    signal: str | None = None
    timed_out: bool = False
    stdout: str = ""
    stderr: str = ""
    duration_ms: int | None = None
    truncated: bool = False
    running: bool = False
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @classmethod
    def from_api(cls, exec_id: str, result: dict[str, Any] | None, stdout: str = "", stderr: str = "") -> ExecResult:
        result = result or {}
        return cls(
            exec_id=exec_id,
            exit_code=result.get("exit_code"),
            signal=result.get("signal"),
            timed_out=bool(result.get("timed_out")),
            stdout=stdout,
            stderr=stderr,
            duration_ms=result.get("duration_ms"),
            truncated=bool(result.get("truncated")),
            running=bool(result.get("running")),
            raw=result,
        )


@dataclass
class TransferResult:
    path: str
    size: int
    sha256: str


def create_body(
    *,
    template: str,
    name: str | None = None,
    vcpus: int | None = None,
    memory_mib: int | None = None,
    disk_gib: int | None = None,
    metadata: dict[str, Any] | None = None,
    start: bool = True,
    host: str | None = None,
    anti_affinity: bool = False,
    project: str | None = None,
) -> dict[str, Any]:
    """The create request (``None`` fields are left out: the server's defaults apply).
    ``host`` (operators) pins the VM's host; ``anti_affinity`` keeps it off the hosts holding
    the owner's other VMs; ``project`` (id or slug) is the project it goes into."""
    return {
        "name": name or new_name(),
        "template": template,
        "vcpus": vcpus,
        "memory_mib": memory_mib,
        "disk_gib": disk_gib,
        "metadata": metadata,
        "start": start,
        "host": host,
        "anti_affinity": anti_affinity or None,
        "project": project,
    }


def exec_body(
    cmd: Any,
    *,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    user: str | None = None,
    timeout: float | None = None,
    stdin: Any = None,
    stdin_open: bool = False,
    wait: bool = True,
    tag: str | None = None,
    pty: dict[str, int] | None = None,
    buffer_bytes: int | None = None,
) -> dict[str, Any]:
    """The exec request: a list is the argv, a string runs under ``/bin/sh -c``."""
    if isinstance(cmd, (list, tuple)):
        command: Any = [str(part) for part in cmd]
    elif isinstance(cmd, str):
        command = cmd
    else:
        raise TypeError("cmd is a string (run by /bin/sh -c) or a list of strings (argv)")
    if isinstance(stdin, bytes):
        stdin = stdin.decode("utf-8")  # the API carries stdin as text; use a Process for bytes
    return {
        "command": command,
        "env": dict(env) if env else None,
        "cwd": cwd,
        "user": user,
        "timeout": timeout,
        "stdin": stdin,
        "stdin_open": stdin_open or None,
        "wait": wait,
        "tag": tag,
        "pty": pty,
        "buffer_bytes": buffer_bytes,
    }


def new_name(prefix: str = "sb") -> str:
    import secrets

    return f"{prefix}-{secrets.token_hex(4)}"
