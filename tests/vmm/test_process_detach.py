"""VMMs are detached from the process that launches them (``process.spawn_detached``): they
never become defunct children of a worker, whoever stops them, while the pid file, early-exit
detection with the VMM's log, and exec errors still work. Real processes, no VM."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vms.vmm.base import VmmError
from vms.vmm.process import (
    accel_choice,
    detect_acceleration,
    kill_vmm,
    kvm_usable,
    read_pid,
    running_vmm_pid,
    spawn_detached,
    wait_for_unix_socket,
)

ROOT = Path(__file__).resolve().parents[2]


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from the state on (comm may hold spaces and parentheses)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def _children(pid: int) -> set[int]:
    """Direct children of ``pid``, all threads (a worker's VMM may be forked by any thread)."""
    kids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids.update(int(k) for k in (task / "children").read_text().split())
        except OSError:
            continue
    return kids


def _zombie_children(pid: int) -> set[int]:
    return {kid for kid in _children(pid) if (_stat_fields(kid) or ["?"])[0] in ("Z", "X")}


def _wait_dead(pid: int, timeout: float = 10.0) -> None:
    """Until ``pid`` is gone or a zombie, read from /proc only (as an unrelated process sees it)."""
    deadline = time.monotonic() + timeout
    while (fields := _stat_fields(pid)) is not None and fields[0] not in ("Z", "X"):
        assert time.monotonic() < deadline, f"process {pid} still {fields[0]}"
        time.sleep(0.02)


def _sleeper(runtime_dir: Path, seconds: float) -> list[str]:
    # The runtime dir on the command line identifies the process as the VMM of that dir.
    return [sys.executable, "-c", "import sys, time; time.sleep(float(sys.argv[1]))", str(seconds), str(runtime_dir)]


def test_a_vmm_stopped_by_another_process_leaves_no_zombie_under_the_launcher(tmp_path: Path) -> None:
    # What a Celery pool worker sees: it launched the VMM, another worker stops the VM.
    before = _children(os.getpid())
    pid = spawn_detached(_sleeper(tmp_path, 60), tmp_path)
    try:
        assert read_pid(tmp_path) == pid and running_vmm_pid(tmp_path) == pid
        state, ppid, pgrp, session = _stat_fields(pid)[:4]  # type: ignore[index]
        assert int(ppid) != os.getpid() and pid not in _children(os.getpid())
        assert int(pgrp) == pid and int(session) == pid  # its own session, as before
        stopper = (
            "import sys; from pathlib import Path; from vms.vmm.process import kill_vmm; "
            "kill_vmm(int(sys.argv[1]), Path(sys.argv[2]), term_timeout=5)"
        )
        subprocess.run([sys.executable, "-c", stopper, str(pid), str(tmp_path)], cwd=ROOT, check=True, timeout=30)
        _wait_dead(pid)
        assert running_vmm_pid(tmp_path) is None
        assert _zombie_children(os.getpid()) - before == set()
        assert pid not in _children(os.getpid())
    finally:
        kill_vmm(pid, tmp_path, term_timeout=1)


def test_a_vmm_that_exits_by_itself_leaves_no_zombie_under_the_launcher(tmp_path: Path) -> None:
    # A guest poweroff: the VMM exits on its own while nobody in this process watches.
    before = _children(os.getpid())
    pid = spawn_detached(_sleeper(tmp_path, 0.2), tmp_path)
    _wait_dead(pid)
    assert _zombie_children(os.getpid()) - before == set()
    assert running_vmm_pid(tmp_path) is None


def test_an_early_exit_is_detected_with_the_vmm_log(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print('bad option -Z', file=sys.stderr); sys.exit(2)", str(tmp_path)]
    pid = spawn_detached(argv, tmp_path)
    assert read_pid(tmp_path) == pid
    with pytest.raises(VmmError) as err:
        wait_for_unix_socket(tmp_path / "api.sock", 10, pid=pid, runtime_dir=tmp_path)
    assert "exited during start-up" in err.value.message
    assert "bad option -Z" in err.value.details["log_tail"]  # type: ignore[index]


def test_a_program_that_cannot_be_executed_is_an_error_and_writes_no_pid(tmp_path: Path) -> None:
    before = _children(os.getpid())
    with pytest.raises(VmmError) as err:
        spawn_detached([str(tmp_path / "no-such-vmm"), str(tmp_path)], tmp_path)
    assert "cannot execute" in err.value.message and err.value.details["errno"] == 2  # type: ignore[index]
    assert not (tmp_path / "vmm.pid").exists()
    assert _zombie_children(os.getpid()) - before == set()


def test_the_vmm_gets_the_environment_and_directory_it_is_given(tmp_path: Path) -> None:
    script = "import os; print(os.environ.get('ONLY_THIS'), len(os.environ), os.getcwd(), flush=True)"
    pid = spawn_detached([sys.executable, "-c", script, str(tmp_path)], tmp_path, env={"ONLY_THIS": "yes"})
    _wait_dead(pid)
    deadline = time.monotonic() + 10
    while not (tmp_path / "vmm.log").read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    value, count, cwd = (tmp_path / "vmm.log").read_text().split()
    assert value == "yes" and int(count) <= 2 and Path(cwd) == tmp_path  # (LC_CTYPE may be added)


def test_the_vmm_starts_with_default_signal_dispositions(tmp_path: Path) -> None:
    # sh (not Python, which ignores SIGPIPE itself), with the runtime dir as its $0.
    pid = spawn_detached(["sh", "-c", "sleep 30", str(tmp_path)], tmp_path)
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        ignored = int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)
        assert ignored & (1 << (13 - 1)) == 0  # SIGPIPE (Python ignores it; the VMM must not inherit that)
    finally:
        kill_vmm(pid, tmp_path, term_timeout=2)


def test_acceleration_comes_from_an_argument_not_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_ACCEL", "kvm")  # ignored: settings arrive as arguments
    assert detect_acceleration("tcg") == "tcg" and kvm_usable(forced="tcg") is False
    assert detect_acceleration("kvm") == "kvm" and kvm_usable(forced="KVM") is True
    assert detect_acceleration() == detect_acceleration("auto") == detect_acceleration(None)
    assert accel_choice("") == "auto"
    with pytest.raises(ValueError):
        accel_choice("hvf")
