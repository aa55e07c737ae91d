"""Process helpers shared by the VMM drivers (no Django).

VMM processes must outlive every process of ours (web, workers, host daemon), so they
are spawned detached: through a short-lived launcher (double fork), in their own session,
with stdin closed and their output in a log file in the runtime directory. The launcher
exits at once, so the VMM is adopted by init (or the nearest ``PR_SET_CHILD_SUBREAPER``
ancestor), which reaps it when it exits: a stopped VM never lingers as a defunct child of
the worker that started it. Identity of a running VMM is established from its pid file
*and* its ``/proc/<pid>/cmdline`` (which names the runtime directory), so a recycled pid
is never mistaken for our VMM, and a zombie counts as exited.

Settings come in as arguments (e.g. ``kvm_usable(forced=...)``); nothing here reads the
environment.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import ipaddress
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .base import VmmError, VmmTimeout
from .confinement import LaunchPlan

PID_FILE = "vmm.pid"
LOG_FILE = "vmm.log"
NETNS_DIR = Path("/run/netns")
NETNS_CALL_TIMEOUT = 30.0
_CLONE_NEWNET = 0x40000000

T = TypeVar("T")

_DEFAULT_TSC_KHZ = 2_000_000
ACCEL_CHOICES = ("auto", "kvm", "tcg")
SPAWN_TIMEOUT = 30.0
_REPORT_MAX = 4096
_LAUNCHER_EXIT_TIMEOUT = 5.0

# The launcher of ``spawn_detached``, run as ``python -I -S -c _LAUNCHER <report fd> <plan> argv...``
# (single-threaded, so forking there is safe, unlike in our threaded workers). It forks the
# VMM, which starts a session of its own, confines itself as the plan says (joins its cgroup,
# drops to the VMM user, no_new_privs, checks the files it must read) and execs; the launcher
# reports the VMM's pid, or why it failed (``E<stage> <errno> <detail>``), on the report pipe
# and exits, so the VMM is never a child of the calling process.
_LAUNCHER = r"""
import ctypes, json, os, signal, sys
import warnings  # os.execvp needs it; import it before the VMM user may lose access to the stdlib
report = int(sys.argv[1])
plan = json.loads(sys.argv[2])
argv = sys.argv[3:]
os.set_inheritable(report, False)
status_r, status_w = os.pipe()  # close-on-exec: EOF without data = the exec succeeded
pid = os.fork()
if pid == 0:
    os.close(status_r)
    stage, detail = "exec", ""
    try:
        # Python ignores these at start-up; the VMM gets the defaults (as subprocess does).
        for name in ("SIGPIPE", "SIGXFSZ"):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
        os.setsid()
        stage = "cgroup"
        for procs in plan.get("cgroup_procs", []):
            detail = procs
            with open(procs, "w") as fh:
                fh.write(str(os.getpid()))
        stage, detail = "user", ""
        if plan.get("uid") is not None:
            os.setgroups(plan["groups"])
            os.setgid(plan["gid"])
            os.setuid(plan["uid"])
        if plan.get("no_new_privs"):
            stage = "no_new_privs"
            if ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
                raise OSError(ctypes.get_errno(), "prctl")
        stage = "access"
        for path in plan.get("readable", []):
            detail = path
            os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        for path in plan.get("writable_dirs", []):
            detail = path
            if not os.access(path, os.W_OK | os.X_OK):
                raise PermissionError(13, "not writable")
        stage, detail = "exec", argv[0]
        os.execvp(argv[0], argv)
    except OSError as exc:
        os.write(status_w, f"{stage} {exc.errno or 0} {detail}".encode()[:3000])
    except BaseException as exc:  # anything else must not pass for a successful exec
        os.write(status_w, f"{stage} 0 {exc!r}".encode()[:3000])
    os._exit(127)
os.close(status_w)
failed = b""
while True:
    chunk = os.read(status_r, 4096)
    if not chunk:
        break
    failed += chunk
if failed:
    os.waitpid(pid, 0)
    os.write(report, b"E" + failed.replace(b"\n", b" ") + b"\n")
else:
    # The pid file is written here, before reporting: a caller killed meanwhile (a worker
    # SIGKILLed mid-boot) must not leave a running VMM that nobody can find.
    with open("vmm.pid.tmp", "w") as fh:
        fh.write(f"{pid}\n")
    os.replace("vmm.pid.tmp", "vmm.pid")
    os.write(report, str(pid).encode() + b"\n")
"""


def _setns_net(path: Path) -> None:
    # os.setns arrived in Python 3.12; the libc call is the same thing.
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in_netns(netns: str | None, fn: Callable[..., T], *args: Any, timeout: float = NETNS_CALL_TIMEOUT) -> T:
    """Run ``fn(*args)`` in a short-lived thread switched into network namespace ``netns``
    (a name under ``/run/netns``; ``None``/``""`` = here) and return its result.

    ``setns(CLONE_NEWNET)`` changes only the calling thread, so the caller stays in its
    namespace; processes forked by ``fn`` start in ``netns`` and stay there. A thread rather
    than ``preexec_fn`` because workers are threaded (``preexec_fn`` is unsafe there).
    Raises ``VmmError`` when the namespace does not exist (never silently the host's).
    """
    if not netns:
        return fn(*args)
    path = NETNS_DIR / netns
    if not path.exists():
        raise VmmError(f"network namespace {netns!r} does not exist", details={"path": str(path)})
    box: dict[str, Any] = {}

    def runner() -> None:
        try:
            _setns_net(path)
            box["result"] = fn(*args)
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=runner, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise VmmTimeout(f"call in network namespace {netns!r} did not finish within {timeout:.0f}s")
    if "error" in box:
        error = box["error"]
        if isinstance(error, OSError) and "setns" in str(error):
            raise VmmError(f"cannot enter network namespace {netns!r}: {error}") from error
        raise error
    return box["result"]  # type: ignore[no-any-return]


def spawn_detached(
    argv: Sequence[str],
    runtime_dir: Path,
    *,
    env: dict[str, str] | None = None,
    netns: str | None = None,
    plan: LaunchPlan | None = None,
    pass_fds: Sequence[int] = (),
    timeout: float = SPAWN_TIMEOUT,
) -> int:
    """Start ``argv`` detached and return its pid, also written to ``runtime_dir/vmm.pid``.

    The VMM runs in a new session, stdin ``/dev/null``, stdout/stderr appended to
    ``runtime_dir/vmm.log``, working directory ``runtime_dir``, environment ``env`` (``None``:
    ours). It is started by a short-lived launcher process (double fork) that exits at once,
    so the VMM is not our child: init (or the nearest subreaper) adopts and reaps it, and no
    defunct VMM stays behind under a worker that launched it. With ``netns`` it starts inside
    that network namespace (``call_in_netns``), so a TAP device opened by name is found there.
    ``pass_fds`` stay open, under the same numbers, in the VMM (TAP devices opened by us).

    With ``plan`` (``confinement.VmmConfinement.launch_plan``) the VMM-to-be joins its cgroup,
    drops to the VMM user, sets ``no_new_privs`` and checks that it can read the files it
    needs, all before exec: it never runs a single instruction of the VMM unconfined.

    Raises ``VmmError`` when the program cannot be executed (e.g. not found; no pid file is
    written), when confining it fails (the message names the step and the file), or the
    launcher fails, ``VmmTimeout`` when it does not report within
    ``timeout``. Early exits of the VMM itself are the caller's to detect (``pid_is_vmm``,
    ``wait_for_unix_socket(..., pid=...)``; the reason is in ``log_tail``).
    """
    if not argv:
        raise ValueError("spawn_detached needs a program to run")
    runtime_dir.mkdir(parents=True, exist_ok=True)
    log_path = runtime_dir / LOG_FILE
    plan_json = json.dumps(plan.to_launcher() if plan is not None else {})
    report_r, report_w = os.pipe()
    try:
        with open(log_path, "ab") as log:

            def popen() -> subprocess.Popen[bytes]:
                return subprocess.Popen(  # noqa: S603 - argv built by the driver, no shell
                    [sys.executable or "python3", "-I", "-S", "-c", _LAUNCHER, str(report_w), plan_json, *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=(report_w, *pass_fds),
                    cwd=str(runtime_dir),
                    env=env,
                )

            try:
                launcher = call_in_netns(netns, popen)
            except OSError as exc:
                raise VmmError(f"cannot start the VMM launcher: {exc}", details={"argv": list(argv)}) from exc
    except BaseException:
        os.close(report_r)
        raise
    finally:
        os.close(report_w)  # the launcher holds its own copy; EOF once it exits
    try:
        report = _read_report(report_r, timeout)
    except BaseException:
        launcher.kill()
        raise
    finally:
        os.close(report_r)
        # Reaped here, so the launcher leaves no zombie either; it exits right after reporting.
        try:
            launcher.wait(timeout=_LAUNCHER_EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()
    if report.startswith(b"E"):
        raise _launch_error(report[1:].decode("utf-8", "replace"), argv, plan, runtime_dir)
    if not report.isdigit():
        raise VmmError(
            "the VMM launcher failed",
            details={
                "argv": list(argv),
                "report": report.decode("ascii", "replace"),
                "log_tail": log_tail(runtime_dir),
            },
        )
    return int(report)  # the launcher wrote it to runtime_dir/vmm.pid already


_STAGE_MESSAGES = {
    "cgroup": "cannot put the VMM into its cgroup ({detail}): {reason}",
    "user": "cannot switch the VMM to its user: {reason}",
    "no_new_privs": "cannot set no_new_privs for the VMM: {reason}",
    "access": (
        "the VMM user {user} cannot use {detail} ({reason}): make it and every directory above "
        "it reachable for that user, or set SANDBOX_VMM_USER= (empty) to run VMMs as the caller"
    ),
}


def _launch_error(failure: str, argv: Sequence[str], plan: LaunchPlan | None, runtime_dir: Path) -> VmmError:
    """The ``VmmError`` for the launcher's ``<stage> <errno> <detail>`` report."""
    stage, _, rest = failure.partition(" ")
    code_text, _, detail = rest.partition(" ")
    code = int(code_text) if code_text.isdigit() else 0
    reason = os.strerror(code) if code else "unknown error"
    user = plan.user.name if plan is not None and plan.user is not None else str(os.geteuid())
    template = _STAGE_MESSAGES.get(stage)
    message = template.format(detail=detail, reason=reason, user=user) if template else None
    if message is None:
        message = f"cannot execute {argv[0]}: {reason}"
    return VmmError(message, details={"argv": list(argv), "errno": code, "stage": stage, "path": detail})


_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000


def tap_open(name: str, *, netns: str | None = None) -> int:
    """Open the existing TAP device ``name`` (in ``netns``) as root and return its fd (not
    inheritable; pass it with ``spawn_detached(pass_fds=...)``): the VMM gets the device, not
    the right to open or configure any other (no ``/dev/net/tun``, no ``CAP_NET_ADMIN``).
    Flags as the VMMs use them: no packet info, virtio-net header. ``VmmError`` when the TAP
    does not exist, or is attached elsewhere (``EBUSY``: another VMM still has it)."""

    def attach() -> int:
        # TUNSETIFF would create a missing TAP (we have CAP_NET_ADMIN): look it up first.
        socket.if_nametoindex(name)
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            ifreq = struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)
            fcntl.ioctl(fd, _TUNSETIFF, ifreq)
        except BaseException:
            os.close(fd)
            raise
        return fd

    try:
        return call_in_netns(netns, attach)
    except OSError as exc:
        raise VmmError(f"cannot open TAP device {name}: {exc.strerror or exc}", details={"tap": name}) from exc


def _read_report(fd: int, timeout: float) -> bytes:
    """One line (at most ``_REPORT_MAX`` bytes) from the launcher's report pipe; what was
    read so far at EOF (the launcher died); ``VmmTimeout`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data and len(data) < _REPORT_MAX:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise VmmTimeout(f"the VMM launcher did not report within {timeout:.0f}s")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, _REPORT_MAX)
        if not chunk:
            break
        data += chunk
    return data.partition(b"\n")[0].strip()


def read_pid(runtime_dir: Path) -> int | None:
    """The pid recorded in ``runtime_dir/vmm.pid``, or ``None`` when absent or garbled."""
    try:
        text = (runtime_dir / PID_FILE).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return int(text) if text.isdigit() else None


def pid_is_vmm(pid: int, runtime_dir: Path) -> bool:
    """True when ``pid`` is alive (not a zombie) and its command line mentions ``runtime_dir``."""
    proc = Path("/proc") / str(pid)
    needles = (str(runtime_dir.resolve()).encode(), str(runtime_dir).encode())
    for attempt in range(3):
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return False
        # Field 3 of /proc/<pid>/stat is the state; comm may contain spaces, so split after ')'.
        state = stat.rpartition(")")[2].split()[:1]
        if state and state[0] in ("Z", "X"):
            return False
        if cmdline:
            return any(needle in cmdline for needle in needles)
        # An empty cmdline is transient while the process's memory map is being changed
        # (or permanent for kernel threads): look again briefly before deciding.
        time.sleep(0.01 * (attempt + 1))
    return False


def running_vmm_pid(runtime_dir: Path) -> int | None:
    """The pid of the VMM of ``runtime_dir`` if it is running, else ``None``."""
    pid = read_pid(runtime_dir)
    if pid is None or not pid_is_vmm(pid, runtime_dir):
        return None
    return pid


def wait_pid_exit(pid: int, runtime_dir: Path, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for the VMM ``pid`` to exit; True when it did."""
    deadline = time.monotonic() + timeout
    while True:
        if not pid_is_vmm(pid, runtime_dir):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def kill_vmm(pid: int, runtime_dir: Path, *, term_timeout: float = 5.0, kill_timeout: float = 5.0) -> None:
    """Send SIGTERM, wait ``term_timeout``, then SIGKILL and wait ``kill_timeout``.

    Does nothing when ``pid`` is not (any more) the VMM of ``runtime_dir``. Raises
    ``VmmTimeout`` if the process survives SIGKILL (e.g. stuck in uninterruptible I/O).
    """
    for sig, wait in ((signal.SIGTERM, term_timeout), (signal.SIGKILL, kill_timeout)):
        if not pid_is_vmm(pid, runtime_dir):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_pid_exit(pid, runtime_dir, wait):
            return
    raise VmmTimeout(f"VMM process {pid} did not exit after SIGKILL", details={"pid": pid})


def wait_for_unix_socket(
    path: Path, timeout: float, *, pid: int | None = None, runtime_dir: Path | None = None
) -> None:
    """Wait until a Unix socket at ``path`` accepts a connection.

    When ``pid`` and ``runtime_dir`` are given, fail early with ``VmmError`` if that
    process exits meanwhile. Raises ``VmmTimeout`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while time.monotonic() < deadline:
        if path.exists():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
            try:
                sock.connect(str(path))
                return
            except OSError as exc:
                last = exc
            finally:
                sock.close()
        if pid is not None and runtime_dir is not None and not pid_is_vmm(pid, runtime_dir):
            raise VmmError(
                "VMM process exited during start-up", details={"pid": pid, "log_tail": log_tail(runtime_dir)}
            )
        time.sleep(0.05)
    raise VmmTimeout(f"socket {path} did not accept connections within {timeout:.1f}s", details={"error": repr(last)})


def netdev_counters(pid: int, ifname: str) -> dict[str, int]:
    """Host-side counters of interface ``ifname`` as seen from the network namespace of
    process ``pid`` (``/proc/<pid>/net/dev``; the VMM runs where its TAP is, which may not
    be our namespace, so ``/sys/class/net`` would be the wrong place). Empty when unknown."""
    try:
        lines = (Path("/proc") / str(pid) / "net" / "dev").read_text().splitlines()
    except OSError:
        return {}
    for line in lines[2:]:
        name, sep, rest = line.partition(":")
        if not sep or name.strip() != ifname:
            continue
        fields = rest.split()
        if len(fields) < 10:
            return {}
        return {
            "rx_bytes": int(fields[0]),
            "rx_packets": int(fields[1]),
            "tx_bytes": int(fields[8]),
            "tx_packets": int(fields[9]),
        }
    return {}


def log_tail(runtime_dir: Path, max_bytes: int = 4096) -> str:
    """The last ``max_bytes`` of ``runtime_dir/vmm.log`` (for error details)."""
    try:
        with open(runtime_dir / LOG_FILE, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _kvm_module_loaded_is_pvm() -> bool:
    for path in ("/sys/module/kvm_pvm", "/sys/module/kvm-pvm"):
        if os.path.exists(path):
            return True
    try:
        modules = Path("/proc/modules").read_text()
    except OSError:
        return False
    return any(line.split(" ", 1)[0] == "kvm_pvm" for line in modules.splitlines())


def kvm_usable(*, forced: str | None = None) -> bool:
    """True only when hardware KVM can really run ordinary guests here.

    Conservative: requires vmx/svm in ``/proc/cpuinfo``, ``/dev/kvm`` openable read-write
    and no PVM-based KVM module (which cannot run ordinary guests). ``forced`` (the
    ``SANDBOX_ACCEL`` setting: ``"kvm"``/``"tcg"``) overrides the detection; ``None``,
    ``""`` or ``"auto"`` detect. ``ValueError`` for anything else.
    """
    choice = accel_choice(forced)
    if choice != "auto":
        return choice == "kvm"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    if not flags & {"vmx", "svm"}:
        return False
    if _kvm_module_loaded_is_pvm():
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def detect_acceleration(accel: str | None = "auto") -> str:
    """``"kvm"`` or ``"tcg"``: ``accel`` when it names one, else ``"kvm"`` when KVM really
    works here (``kvm_usable``)."""
    return "kvm" if kvm_usable(forced=accel) else "tcg"


def accel_choice(value: str | None) -> str:
    """``value`` normalised to one of ``ACCEL_CHOICES`` (``None``/``""`` = ``"auto"``);
    ``ValueError`` for anything else."""
    choice = (value or "auto").strip().lower()
    if choice not in ACCEL_CHOICES:
        raise ValueError(f"acceleration must be one of {', '.join(ACCEL_CHOICES)}, not {value!r}")
    return choice


def host_tsc_khz() -> int:
    """Host TSC frequency in kHz (from ``/proc/cpuinfo`` 'cpu MHz'), for ``tsc_early_khz=``.

    Under TCG several guests booting at once can fail PIT-based TSC calibration; telling
    the kernel the frequency up front avoids the calibration.
    """
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return _DEFAULT_TSC_KHZ
    match = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", cpuinfo, re.MULTILINE)
    if match:
        khz = int(float(match.group(1)) * 1000)
        if khz > 0:
            return khz
    return _DEFAULT_TSC_KHZ


def host_uses_tsc() -> bool:
    """Whether the host's kernel keeps time with the TSC (its current clocksource): then the TSC
    is stable across the host's CPUs, and a TCG guest, whose TSC is the host's, may trust it too."""
    try:
        current = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource").read_text()
    except OSError:
        return False
    return current.strip() == "tsc"


def remove_path_quietly(path: Path) -> None:
    """Unlink ``path`` if it exists (files and sockets)."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno not in (errno.ENOENT,):
            raise


# ----- live migration: listening on a host's underlay address -------------------------


def listen_address_check(host: str) -> None:
    """``host`` must be an IP address (the host's underlay address), not a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise VmmError(f"the migration listen address must be an IP address, not {host!r}") from exc


def uri_host(host: str) -> str:
    """``host`` inside a ``tcp:``/``nbd://`` URI: IPv6 addresses in brackets."""
    return f"[{host}]" if ":" in host else host


def listening_socket(host: str) -> socket.socket:
    """A TCP socket bound to ``host`` on a port the kernel picks, in the calling thread's
    network namespace (``call_in_netns``), listening: handed to QEMU (``getfd``), or closed to
    learn a free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(4)
    except OSError as exc:
        sock.close()
        raise VmmError(f"cannot listen on {host}: {exc}") from exc
    return sock
