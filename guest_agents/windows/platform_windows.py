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
- Signals: ``INT``/``BREAK`` -> ``CTRL_BREAK_EVENT`` to the process group (on a PTY exec:
  Ctrl-C typed into the pseudo console, which raises ``CTRL_C_EVENT`` in the attached
  processes); ``TERM`` -> ``taskkill /T`` (a polite close request); ``KILL`` -> ``taskkill /T /F``.
- PTYs: ConPTY (Windows 10 1809 / Server 2019 and later): ``CreatePseudoConsole`` on two
  pipes, the process started by ``CreateProcessW`` with the
  ``PROC_THREAD_ATTRIBUTE_PSEUDOCONSOLE`` attribute, ``ResizePseudoConsole`` for
  ``exec_resize``; stdin ``eof`` types Ctrl-Z, Enter (end of input for console programs).
- Identity (``identity_set``): hostname through ``Rename-Computer`` (Windows applies a new
  computer name at the next restart; ``ping`` reports the old one until then), machine id =
  ``HKLM\\SOFTWARE\\Microsoft\\Cryptography\\MachineGuid``, clock through ``SetSystemTime``,
  MAC through the adapter's ``NetworkAddress`` property, IPv4 through ``New-NetIPAddress``;
  ``entropy`` is not applied (Windows offers no interface to mix bytes into its RNG; it
  reseeds on its own), so ``applied`` lacks ``"entropy"``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from agent_core import PORT_NAME, Platform, log

if sys.platform == "win32":  # the ctypes Win32 declarations below exist only there
    import ctypes
    from ctypes import wintypes

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

    def send_signal(self, proc: Any, name: str, group: bool, term: Any = None) -> bool:
        import signal

        try:
            if name == "INT" and term is not None:
                term.write(b"\x03")
            elif name in ("INT", "BREAK"):
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

    # -- terminals (ConPTY)
    pty_eof = b"\x1a\r"

    def spawn_pty(self, argv: list[str], *, env: dict[str, str], cwd: str, rows: int, cols: int) -> tuple[Any, Any]:
        console = ConPty(argv, env=env, cwd=cwd, rows=rows, cols=cols)
        return console, console

    # -- identity
    def _powershell(self, script: str, timeout: float = 60) -> str:
        proc = subprocess.run(  # noqa: S603
            [POWERSHELL, "-NoProfile", "-NonInteractive", "-Command", script],
            capture_output=True, timeout=timeout, creationflags=CREATE_NO_WINDOW, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise OSError(f"PowerShell failed: {proc.stderr.decode('utf-8', 'replace')[-500:]}")
        return proc.stdout.decode("utf-8", "replace")

    def machine_id(self) -> str:
        import winreg

        try:
            with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"SOFTWARE\Microsoft\Cryptography") as key:
                return uuid.UUID(str(winreg.QueryValueEx(key, "MachineGuid")[0])).hex
        except (OSError, ValueError):
            return ""

    def set_machine_id(self, value: str) -> None:
        import winreg

        access = winreg.KEY_SET_VALUE | winreg.KEY_WOW64_64KEY
        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"SOFTWARE\Microsoft\Cryptography", 0, access) as key:
            winreg.SetValueEx(key, "MachineGuid", 0, winreg.REG_SZ, str(uuid.UUID(hex=value)))

    def set_hostname(self, name: str) -> None:
        # ``name`` matched [a-z0-9-]{1,63} in the core: safe inside single quotes.
        self._powershell(f"Rename-Computer -NewName '{name}' -Force -WarningAction SilentlyContinue")

    def set_clock(self, unix: float) -> None:
        t = time.gmtime(unix)
        st = _SYSTEMTIME(t.tm_year, t.tm_mon, (t.tm_wday + 1) % 7, t.tm_mday, t.tm_hour, t.tm_min,
                         min(t.tm_sec, 59), int((unix % 1) * 1000))  # fmt: skip
        if not ctypes.windll.kernel32.SetSystemTime(ctypes.byref(st)):  # type: ignore[attr-defined]
            raise ctypes.WinError()  # type: ignore[attr-defined]

    def add_entropy(self, blob: bytes) -> bool:
        return False

    def interfaces(self) -> dict[str, str]:
        out = self._powershell("Get-NetAdapter | Select-Object Name, MacAddress | ConvertTo-Json -Compress")
        items = json.loads(out or "[]")
        if isinstance(items, dict):
            items = [items]
        return {str(i["Name"]): str(i["MacAddress"]).replace("-", ":").lower() for i in items if i.get("MacAddress")}

    def set_mac(self, ifname: str, mac: str) -> None:
        # ``ifname`` is one of interfaces() (quotes doubled), ``mac`` matched the MAC pattern.
        name = ifname.replace("'", "''")
        value = mac.replace(":", "").upper()
        self._powershell(
            f"Set-NetAdapterAdvancedProperty -Name '{name}' -RegistryKeyword NetworkAddress -RegistryValue '{value}'"
        )

    def set_ipv4(self, ifname: str, address: str, gateway: str) -> None:
        name = ifname.replace("'", "''")
        ip, prefix = address.split("/")
        script = (
            f"Get-NetIPAddress -InterfaceAlias '{name}' -AddressFamily IPv4 -ErrorAction SilentlyContinue"
            " | Remove-NetIPAddress -Confirm:$false; "
            f"Get-NetRoute -InterfaceAlias '{name}' -DestinationPrefix 0.0.0.0/0 -ErrorAction SilentlyContinue"
            " | Remove-NetRoute -Confirm:$false; "
            f"New-NetIPAddress -InterfaceAlias '{name}' -IPAddress {ip} -PrefixLength {prefix}"
            + (f" -DefaultGateway {gateway}" if gateway else "")
            + " | Out-Null"
        )
        self._powershell(script)


# ----- ConPTY ------------------------------------------------------------------------------

EXTENDED_STARTUPINFO_PRESENT = 0x00080000
CREATE_UNICODE_ENVIRONMENT = 0x00000400
PROC_THREAD_ATTRIBUTE_PSEUDOCONSOLE = 0x00020016
INFINITE = 0xFFFFFFFF
WAIT_TIMEOUT = 0x102

if sys.platform == "win32":

    class _COORD(ctypes.Structure):
        _fields_ = [("X", wintypes.SHORT), ("Y", wintypes.SHORT)]

    class _SYSTEMTIME(ctypes.Structure):
        _fields_ = [(n, wintypes.WORD) for n in (
            "wYear", "wMonth", "wDayOfWeek", "wDay", "wHour", "wMinute", "wSecond", "wMilliseconds")]  # fmt: skip

    class _STARTUPINFOW(ctypes.Structure):
        _fields_ = [
            ("cb", wintypes.DWORD), ("lpReserved", wintypes.LPWSTR), ("lpDesktop", wintypes.LPWSTR),
            ("lpTitle", wintypes.LPWSTR), ("dwX", wintypes.DWORD), ("dwY", wintypes.DWORD),
            ("dwXSize", wintypes.DWORD), ("dwYSize", wintypes.DWORD), ("dwXCountChars", wintypes.DWORD),
            ("dwYCountChars", wintypes.DWORD), ("dwFillAttribute", wintypes.DWORD), ("dwFlags", wintypes.DWORD),
            ("wShowWindow", wintypes.WORD), ("cbReserved2", wintypes.WORD), ("lpReserved2", ctypes.c_void_p),
            ("hStdInput", wintypes.HANDLE), ("hStdOutput", wintypes.HANDLE), ("hStdError", wintypes.HANDLE),
        ]  # fmt: skip

    class _STARTUPINFOEXW(ctypes.Structure):
        _fields_ = [("StartupInfo", _STARTUPINFOW), ("lpAttributeList", ctypes.c_void_p)]

    class _PROCESS_INFORMATION(ctypes.Structure):  # noqa: N801 - the Win32 name
        _fields_ = [
            ("hProcess", wintypes.HANDLE), ("hThread", wintypes.HANDLE),
            ("dwProcessId", wintypes.DWORD), ("dwThreadId", wintypes.DWORD),
        ]  # fmt: skip


class ConPty:
    """A process on a Windows pseudo console: Popen-like (``pid``, ``wait``, ``returncode``)
    and terminal-like (``read``, ``write``, ``resize``, ``close``) at once."""

    def __init__(self, argv: list[str], *, env: dict[str, str], cwd: str, rows: int, cols: int) -> None:
        k32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        self._k32 = k32
        self._closed = False
        in_read, self._in = wintypes.HANDLE(), wintypes.HANDLE()
        self._out, out_write = wintypes.HANDLE(), wintypes.HANDLE()
        if not k32.CreatePipe(ctypes.byref(in_read), ctypes.byref(self._in), None, 0):
            raise ctypes.WinError()  # type: ignore[attr-defined]
        if not k32.CreatePipe(ctypes.byref(self._out), ctypes.byref(out_write), None, 0):
            raise ctypes.WinError()  # type: ignore[attr-defined]
        self._hpc = wintypes.HANDLE()
        hr = k32.CreatePseudoConsole(_COORD(cols, rows), in_read, out_write, 0, ctypes.byref(self._hpc))
        # The console holds its own references to its ends of the pipes.
        k32.CloseHandle(in_read)
        k32.CloseHandle(out_write)
        if hr != 0:
            raise OSError(f"CreatePseudoConsole failed: HRESULT {hr & 0xFFFFFFFF:#x}")
        size = ctypes.c_size_t()
        k32.InitializeProcThreadAttributeList(None, 1, 0, ctypes.byref(size))
        self._attrs = ctypes.create_string_buffer(size.value)
        if not k32.InitializeProcThreadAttributeList(self._attrs, 1, 0, ctypes.byref(size)):
            raise ctypes.WinError()  # type: ignore[attr-defined]
        if not k32.UpdateProcThreadAttribute(
            self._attrs, 0, PROC_THREAD_ATTRIBUTE_PSEUDOCONSOLE, self._hpc, ctypes.sizeof(wintypes.HANDLE), None, None
        ):
            raise ctypes.WinError()  # type: ignore[attr-defined]
        si = _STARTUPINFOEXW()
        si.StartupInfo.cb = ctypes.sizeof(_STARTUPINFOEXW)
        si.lpAttributeList = ctypes.cast(self._attrs, ctypes.c_void_p)
        pi = _PROCESS_INFORMATION()
        block = "".join(f"{k}={v}\0" for k, v in env.items()) + "\0"
        cmdline = ctypes.create_unicode_buffer(subprocess.list2cmdline(argv))
        if not k32.CreateProcessW(
            None, cmdline, None, None, False, EXTENDED_STARTUPINFO_PRESENT | CREATE_UNICODE_ENVIRONMENT,
            ctypes.create_unicode_buffer(block), cwd, ctypes.byref(si), ctypes.byref(pi),
        ):  # fmt: skip
            err = ctypes.WinError()  # type: ignore[attr-defined]
            self.close()
            raise err
        k32.CloseHandle(pi.hThread)
        self._proc = pi.hProcess
        self.pid = int(pi.dwProcessId)
        self.returncode: int | None = None

    def read(self, n: int) -> bytes:
        buf = ctypes.create_string_buffer(n)
        got = wintypes.DWORD()
        if not self._k32.ReadFile(self._out, buf, n, ctypes.byref(got), None):
            return b""  # the pseudo console was closed: no more output
        return buf.raw[: got.value]

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            done = wintypes.DWORD()
            chunk = bytes(view[:65536])
            if not self._k32.WriteFile(self._in, chunk, len(chunk), ctypes.byref(done), None):
                raise ctypes.WinError()  # type: ignore[attr-defined]
            view = view[done.value :]

    def resize(self, rows: int, cols: int) -> None:
        hr = self._k32.ResizePseudoConsole(self._hpc, _COORD(cols, rows))
        if hr != 0:
            raise OSError(f"ResizePseudoConsole failed: HRESULT {hr & 0xFFFFFFFF:#x}")

    def wait(self, timeout: float | None = None) -> int:
        ms = INFINITE if timeout is None else max(0, int(timeout * 1000))
        if self._k32.WaitForSingleObject(self._proc, ms) == WAIT_TIMEOUT:
            raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
        code = wintypes.DWORD()
        self._k32.GetExitCodeProcess(self._proc, ctypes.byref(code))
        self.returncode = int(code.value)
        return self.returncode

    def close(self) -> None:
        """Close the pseudo console (its reader then sees the end) and the handles."""
        if self._closed:
            return
        self._closed = True
        self._k32.ClosePseudoConsole(self._hpc)
        for handle in (self._in, self._out, getattr(self, "_proc", None)):
            if handle:
                self._k32.CloseHandle(handle)
        self._k32.DeleteProcThreadAttributeList(self._attrs)


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
