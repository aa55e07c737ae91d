"""The Windows agent's platform layer: the virtio-serial port, process creation and killing,
health from WMI/CIM. NOT RUN HERE: this project's CI has no Windows guest (no Windows media
can be obtained on these machines); it is written against the documented Win32 behaviour and
reviewed, not executed. The protocol side (``agent_core``) is tested on Linux through
``platform_posix``.

- Port: ``\\\\.\\Global\\org.microvm_sandbox.agent.0``, created by the virtio-serial driver
  (vioser, from the virtio-win ISO) for QEMU's ``virtserialport`` of that name. Opened as a
  file; a read error or EOF means the host side is gone: the agent closes it and reopens it
  every 0.5 s.
- Processes: ``CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW``; killing a tree uses
  ``taskkill /T /F /PID`` (children included, like the Linux agent's cgroup kill). A killed or
  timed-out process reports ``exit_code: null, signal: "SIGKILL"`` as on Linux.
- Shell: ``shell`` runs through Windows PowerShell (``powershell.exe -NoProfile
  -NonInteractive -ExecutionPolicy Bypass -Command``); its exit code is the script's
  ``$LASTEXITCODE``/``exit N``. ``argv`` starting with ``cmd`` runs cmd.exe as asked.
- Health: ``Win32_OperatingSystem`` (memory, last boot) and ``Win32_LogicalDisk`` of the system
  drive through ``Get-CimInstance``, cached for 5 s (PowerShell starts slowly).
- Signals: ``INT``/``BREAK`` -> ``CTRL_BREAK_EVENT`` to the process group; ``TERM`` ->
  ``taskkill /T`` (a polite close request); ``KILL`` -> ``taskkill /T /F``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from typing import Any

from agent_core import PORT_NAME, Platform, log

PORT_PATH = "\\\\.\\Global\\" + PORT_NAME
CREATE_NEW_PROCESS_GROUP = 0x00000200
CREATE_NO_WINDOW = 0x08000000
HEALTH_CACHE_SECONDS = 5.0
POWERSHELL = "powershell.exe"

_HEALTH_SCRIPT = (
    "$os = Get-CimInstance Win32_OperatingSystem; "
    "$d = Get-CimInstance Win32_LogicalDisk -Filter \"DeviceID='$env:SystemDrive'\"; "
    "@{total=$os.TotalVisibleMemorySize; free=$os.FreePhysicalMemory; "
    "boot=$os.LastBootUpTime.ToUniversalTime().ToString('o'); "
    "disk_free=$d.FreeSpace; disk_total=$d.Size} | ConvertTo-Json -Compress"
)


class WindowsPlatform(Platform):
    name = "windows"
    transport = "virtio-serial"

    def __init__(self) -> None:
        self._boot_id = ""
        self._health: dict[str, Any] = {}
        self._health_at = 0.0

    def _cim(self) -> dict[str, Any]:
        if time.monotonic() - self._health_at < HEALTH_CACHE_SECONDS and self._health:
            return self._health
        try:
            out = subprocess.run(  # noqa: S603
                [POWERSHELL, "-NoProfile", "-NonInteractive", "-Command", _HEALTH_SCRIPT],
                capture_output=True, timeout=20, creationflags=CREATE_NO_WINDOW, check=False,
            ).stdout  # fmt: skip
            self._health = json.loads(out.decode("utf-8", "replace") or "{}")
        except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
            log(f"CIM query failed: {exc!r}")
        self._health_at = time.monotonic()
        return self._health

    def boot_id(self) -> str:
        # Stable for one boot: derived from the last boot time Windows reports.
        if not self._boot_id:
            boot = str(self._cim().get("boot", "")) or str(time.time() - self.uptime_s())
            self._boot_id = str(uuid.uuid5(uuid.NAMESPACE_URL, "boot:" + boot))
        return self._boot_id

    def uptime_s(self) -> float:
        import ctypes

        return float(ctypes.windll.kernel32.GetTickCount64()) / 1000.0  # type: ignore[attr-defined]

    def hostname(self) -> str:
        return socket.gethostname()

    def health(self) -> dict[str, Any]:
        cim = self._cim()
        return {
            "mem_total_kib": int(cim.get("total") or 0),
            "mem_available_kib": int(cim.get("free") or 0),
            "root_free_bytes": int(cim.get("disk_free") or 0),
            "root_total_bytes": int(cim.get("disk_total") or 0),
            "loadavg": [],
        }

    def shell_argv(self, command: str) -> list[str]:
        return [POWERSHELL, "-NoProfile", "-NonInteractive", "-ExecutionPolicy", "Bypass", "-Command", command]

    def default_env(self) -> dict[str, str]:
        return dict(os.environ)

    def default_cwd(self) -> str:
        return os.environ.get("SYSTEMDRIVE", "C:") + "\\"

    def spawn(self, argv: list[str], *, env: dict[str, str], cwd: str, stdin_pipe: bool) -> Any:
        return subprocess.Popen(  # noqa: S603 - running commands is the agent's job
            argv,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            creationflags=CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW,
        )

    def kill_tree(self, proc: Any) -> None:
        subprocess.run(  # noqa: S603
            ["taskkill", "/T", "/F", "/PID", str(proc.pid)],
            capture_output=True, timeout=30, creationflags=CREATE_NO_WINDOW, check=False,
        )  # fmt: skip

    def send_signal(self, proc: Any, name: str, group: bool) -> bool:
        import signal

        try:
            if name in ("INT", "BREAK"):
                proc.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
            elif name == "TERM":
                args = ["taskkill", "/T", "/PID", str(proc.pid)] if group else ["taskkill", "/PID", str(proc.pid)]
                subprocess.run(args, capture_output=True, timeout=30, creationflags=CREATE_NO_WINDOW, check=False)  # noqa: S603
            else:
                return False
        except OSError:
            return False
        return True

    def exit_status(self, returncode: int, killed: bool) -> tuple[int | None, str | None]:
        if killed:
            return None, "SIGKILL"
        return returncode, None

    def is_absolute(self, path: str) -> bool:
        return os.path.isabs(path) and len(os.path.splitdrive(path)[0]) > 0

    def owner_names(self, st: os.stat_result) -> tuple[str, str]:
        return "", ""


def serial_port_streams() -> tuple[Callable[[int], bytes], Callable[[bytes], Any], Callable[[], None]]:
    """Open the agent's virtio-serial port: ``(read, write, close)``; waits until it exists."""
    while True:
        try:
            port = open(PORT_PATH, "r+b", buffering=0)  # noqa: SIM115 - the agent keeps it open
            break
        except OSError:
            time.sleep(0.5)

    def read(n: int) -> bytes:
        return port.read(n) or b""

    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = port.write(view)
            view = view[written or 0 :]

    return read, write, port.close
