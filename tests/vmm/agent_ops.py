"""Small protocol-v2 helpers over ``vms.vmm.agent_client.AgentConnection`` for tests: run a
command to completion, upload and download a file (with the protocol's checksums)."""

from __future__ import annotations

import hashlib
from typing import Any

from vms.vmm.agent_client import AgentConnection


def agent_run(
    conn: AgentConnection, *, argv: list[str] | None = None, shell: str | None = None, stdin: bytes = b"",
    timeout: float | None = None, wait: float = 60.0, **extra: Any,
) -> tuple[dict[str, Any], bytes]:  # fmt: skip
    """``exec_start`` then ``exec_wait`` then ``exec_read`` from offset 0: ``(result, output)``."""
    args: dict[str, Any] = {"argv": argv} if argv is not None else {"shell": shell}
    if timeout is not None:
        args["timeout"] = timeout
    if stdin:
        args["stdin_eof"] = True
    args.update(extra)
    started = conn.request("exec_start", args, stdin, timeout=10)
    summary = conn.request("exec_wait", {"exec_id": started["exec_id"], "timeout": wait}, timeout=wait + 10)
    assert summary["running"] is False, summary
    out = b""
    offset = 0
    while True:
        got, data = conn.request_data("exec_read", {"exec_id": started["exec_id"], "offset": offset}, timeout=10)
        out += data
        if got["next_offset"] >= got["end_offset"] or not data:
            break
        offset = got["next_offset"]
    return summary["result"], out


def agent_put(conn: AgentConnection, path: str, data: bytes, **args: Any) -> dict[str, Any]:
    """Upload ``data`` to ``path`` in 256 KiB frames; the agent checks the SHA-256."""
    handle = conn.request("file_write_open", {"path": path, **args}, timeout=10)["handle"]
    for pos in range(0, len(data), 256 << 10):
        conn.request("file_write", {"handle": handle}, data[pos : pos + (256 << 10)], timeout=30)
    return conn.request("file_write_close", {"handle": handle, "sha256": hashlib.sha256(data).hexdigest()}, timeout=30)


def agent_get(conn: AgentConnection, path: str) -> tuple[bytes, str]:
    """Download ``path``: ``(bytes, sha256 the agent computed)``."""
    opened = conn.request("file_read_open", {"path": path, "sha256": True}, timeout=60)
    out = b""
    while True:
        got, data = conn.request_data("file_read", {"handle": opened["handle"], "max": 256 << 10}, timeout=30)
        out += data
        if got["eof"]:
            break
    closed = conn.request("file_read_close", {"handle": opened["handle"]}, timeout=10)
    return out, closed["sha256"]
