"""An idle guest agent does not wake up by itself: under TCG every wakeup of an idle guest costs
the host CPU (docs/benchmarks.md, density). Its reaper tick runs only while an exec lives."""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
from pathlib import Path
from types import ModuleType

from vms.vmm.agent_client import AgentConnection

ROOT = Path(__file__).resolve().parents[2]


def _load_guest_agent() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sandbox_agent_idle", ROOT / "guest_agents/linux/sandbox_agent.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


agent = _load_guest_agent()


def test_a_new_agent_has_no_timer_pending() -> None:
    a = agent.Agent(cgroup_root=None, reap_interval=0.02)
    assert [t for t in a.loop.timers if t.alive] == []
    assert a.reap_timer is None


def test_the_idle_event_loop_sleeps_until_an_fd_or_a_timer() -> None:
    loop = agent.Loop()
    waits: list[float | None] = []
    loop.sel.select = lambda timeout=None: waits.append(timeout) or []  # type: ignore[method-assign]
    loop.run_once()
    assert waits == [agent.IDLE_WAIT_SECONDS] and agent.IDLE_WAIT_SECONDS >= 30
    loop.call_later(0.5, lambda: None)
    loop.run_once()
    assert 0 < waits[1] <= 0.5  # a timer still ends the wait in time


def test_the_reaper_ticks_only_while_an_exec_lives() -> None:
    host, guest = socket.socketpair()
    a = agent.Agent(cgroup_root=None, reap_interval=0.02)
    a.add_stream(guest)
    # In a thread there is no SIGCHLD handler: the reaper tick is the only reaper here.
    threading.Thread(target=a.run, daemon=True).start()
    conn = AgentConnection(host)
    conn.sync_session(time.monotonic() + 5)
    started = conn.request("exec_start", {"argv": ["sleep", "0.3"]}, timeout=10)
    assert a.reap_timer is not None
    summary = conn.request("exec_wait", {"exec_id": started["exec_id"], "timeout": 20}, timeout=25)
    assert summary["running"] is False and summary["result"]["exit_code"] == 0
    deadline = time.monotonic() + 10
    while a.reap_timer is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert a.reap_timer is None
    conn.close()
