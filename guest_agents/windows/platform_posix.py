"""The Windows agent's platform interface on Linux/POSIX: how its protocol side
(``agent_core``) runs here, in tests and during development, against the same conformance
suite as the Linux agent. Not shipped to Windows guests.

Terminals are ``openpty`` pairs (the child takes the slave as its controlling terminal);
identity changes are the Linux calls the Linux agent makes (``sethostname`` and
``/etc/hostname``/``/etc/hosts``, ``/etc/machine-id``, ``clock_settime``, the random pool's
ioctls, ``ip link``/``ip addr``): the conformance suite runs them in namespaces of its own.
"""

from __future__ import annotations

import fcntl
import grp
import os
import pwd
import select
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
from typing import Any

from agent_core import Platform

_BOOT_ID = "/proc/sys/kernel/random/boot_id"
_RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
_RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
_READ_POLL = 0.5


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _take_controlling_terminal() -> None:
    # In the child, after setsid (start_new_session): stdin is the slave.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class PosixTerminal:
    """The master side of a pseudo-terminal. ``close`` only marks it closed: the reader
    thread closes the descriptor when it stops, so no other thread ever uses a number the
    kernel may have handed out again."""

    def __init__(self, master: int) -> None:
        self.fd = master
        self.closed = False
        self.reading = True
        self.lock = threading.Lock()

    def read(self, n: int) -> bytes:
        while not self.closed:
            try:
                ready, _, _ = select.select([self.fd], [], [], _READ_POLL)
                data = os.read(self.fd, n) if ready else None
            except (OSError, ValueError):
                data = b""  # EIO: no process has the terminal open any more
            if data is None:
                continue
            if data:
                return data
            break
        self._stop_reading()
        return b""

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            with self.lock:
                if self.fd < 0:
                    raise OSError("terminal closed")
                written = os.write(self.fd, view)
            view = view[written:]

    def resize(self, rows: int, cols: int) -> None:
        with self.lock:
            if self.fd >= 0:
                _set_winsize(self.fd, rows, cols)  # the kernel sends SIGWINCH to the foreground group

    def close(self) -> None:
        with self.lock:
            self.closed = True
            if not self.reading:
                self._close_fd()

    def _stop_reading(self) -> None:
        with self.lock:
            self.reading = False
            self.closed = True
            self._close_fd()

    def _close_fd(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1


class PosixPlatform(Platform):
    name = "posix"
    transport = "socket"

    def __init__(self) -> None:
        # Whatever started the agent may have left signals ignored or blocked (nohup, a service
        # manager, a script); both carry over across exec into every command, which would then
        # ignore a signal frame.
        # Hosted in a thread (a test's stand-in), it leaves the host process's signals alone.
        if threading.current_thread() is not threading.main_thread():
            return
        for name in ("SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGALRM"):
            sig = getattr(signal, name)
            if signal.getsignal(sig) == signal.SIG_IGN:
                signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())

    def boot_id(self) -> str:
        try:
            with open(_BOOT_ID) as fh:
                return fh.read().strip()
        except OSError:
            return "posix-" + str(int(time.time()))

    def uptime_s(self) -> float:
        try:
            with open("/proc/uptime") as fh:
                return float(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            return 0.0

    def hostname(self) -> str:
        return socket.gethostname()

    def health(self) -> dict[str, Any]:
        mem: dict[str, int] = {}
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    key, _, rest = line.partition(":")
                    if key in ("MemTotal", "MemAvailable"):
                        mem[key] = int(rest.split()[0])
        except (OSError, ValueError):
            pass
        st = os.statvfs("/")
        return {
            "loadavg": list(os.getloadavg()),
            "mem_total_kib": mem.get("MemTotal", 0),
            "mem_available_kib": mem.get("MemAvailable", 0),
            "root_free_bytes": st.f_bavail * st.f_frsize,
            "root_total_bytes": st.f_blocks * st.f_frsize,
        }

    def shell_argv(self, command: str) -> list[str]:
        return ["/bin/sh", "-c", command]

    def default_env(self) -> dict[str, str]:
        home = os.path.expanduser("~")
        return {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": home,
            "LANG": "C.UTF-8",
        }

    def default_cwd(self) -> str:
        home = os.path.expanduser("~")
        return home if os.path.isdir(home) else "/"

    def spawn(self, argv: list[str], *, env: dict[str, str], cwd: str, stdin_pipe: bool) -> Any:
        return subprocess.Popen(  # noqa: S603 - running commands is the agent's job
            argv,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            start_new_session=True,
            close_fds=True,
        )

    def spawn_pty(self, argv: list[str], *, env: dict[str, str], cwd: str, rows: int, cols: int) -> tuple[Any, Any]:
        master, slave = os.openpty()
        try:
            _set_winsize(master, rows, cols)
            proc = subprocess.Popen(  # noqa: S603 - running commands is the agent's job
                argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                cwd=cwd,
                env=env,
                start_new_session=True,
                close_fds=True,
                preexec_fn=_take_controlling_terminal,  # noqa: PLW1509 - one ioctl, no locks
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        return proc, PosixTerminal(master)

    def kill_tree(self, proc: Any) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass

    def send_signal(self, proc: Any, name: str, group: bool, term: Any = None) -> bool:
        try:
            sig = int(name) if name.isdigit() else getattr(signal, "SIG" + name)
            if group:
                os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)
        except (AttributeError, ValueError, OSError):
            return False
        return True

    def exit_status(self, returncode: int, killed: bool) -> tuple[int | None, str | None]:
        if returncode < 0:
            return None, signal.Signals(-returncode).name
        return returncode, None

    def is_absolute(self, path: str) -> bool:
        return path.startswith("/")

    def owner_names(self, st: os.stat_result) -> tuple[str, str]:
        try:
            user = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            user = str(st.st_uid)
        try:
            group = grp.getgrgid(st.st_gid).gr_name
        except KeyError:
            group = str(st.st_gid)
        return user, group

    # -- identity
    def machine_id(self) -> str:
        try:
            with open("/etc/machine-id") as fh:
                return fh.readline().strip()
        except OSError:
            return ""

    def set_machine_id(self, value: str) -> None:
        _write_replacing("/etc/machine-id", f"{value}\n")

    def set_hostname(self, name: str) -> None:
        socket.sethostname(name)
        _write_replacing("/etc/hostname", f"{name}\n")
        try:
            with open("/etc/hosts") as fh:
                lines = [ln for ln in fh.read().splitlines() if not ln.startswith("127.0.1.1")]
        except OSError:
            lines = ["127.0.0.1\tlocalhost"]
        lines.insert(1, f"127.0.1.1\t{name}")
        _write_replacing("/etc/hosts", "\n".join(lines) + "\n")

    def set_clock(self, unix: float) -> None:
        time.clock_settime(time.CLOCK_REALTIME, unix)

    def add_entropy(self, blob: bytes) -> bool:
        try:
            fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, _RNDADDENTROPY, struct.pack("ii", len(blob) * 8, len(blob)) + blob)
                fcntl.ioctl(fd, _RNDRESEEDCRNG)
            finally:
                os.close(fd)
        except OSError:
            return False
        return True

    def interfaces(self) -> dict[str, str]:
        out = {}
        for name in sorted(os.listdir("/sys/class/net")):
            if name == "lo":
                continue
            try:
                with open(f"/sys/class/net/{name}/address") as fh:
                    out[name] = fh.readline().strip()
            except OSError:
                out[name] = ""
        return out

    def set_mac(self, ifname: str, mac: str) -> None:
        _ip("link", "set", "dev", ifname, "address", mac)

    def set_ipv4(self, ifname: str, address: str, gateway: str) -> None:
        _ip("-4", "addr", "flush", "dev", ifname)
        _ip("addr", "add", address, "dev", ifname)
        _ip("link", "set", ifname, "up")
        if gateway:
            _ip("route", "replace", "default", "via", gateway, "dev", ifname)


def _write_replacing(path: str, text: str) -> None:
    tmp = path + ".sandbox-tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, timeout=10, capture_output=True, stdin=subprocess.DEVNULL)  # noqa: S603, S607
