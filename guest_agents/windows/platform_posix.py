"""The Windows agent's platform interface on Linux/POSIX: how its protocol side
(``agent_core``) runs here, in tests and during development, against the same conformance
suite as the Linux agent. Not shipped to Windows guests."""

from __future__ import annotations

import grp
import os
import pwd
import signal
import socket
import subprocess
import time
from typing import Any

from agent_core import Platform

_BOOT_ID = "/proc/sys/kernel/random/boot_id"


class PosixPlatform(Platform):
    name = "posix"
    transport = "socket"

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

    def kill_tree(self, proc: Any) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass

    def send_signal(self, proc: Any, name: str, group: bool) -> bool:
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
