"""``msbx``: the command-line client (docs/cli.md).

Errors are one line on stderr (``msbx: error: ...``) and an exit status per kind of error
(``SandboxError.exit_code``; the table is in docs/cli.md). ``msbx exec`` exits with the
command's own status.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, Callable

from msbx import __version__
from msbx.client import Client, Operation, Sandbox
from msbx.config import config_save_profile
from msbx.errors import ApiError, SandboxError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TIMED_OUT = 124  # like timeout(1): the command's timeout killed it
DETACH_DEFAULT = "^]"


class Cli:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._client: Client | None = None
        self.debug = bool(args.debug)

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(
                self.args.url,
                self.args.token,
                profile=self.args.profile,
                timeout=self.args.timeout,
                on_response=self._log if self.debug else None,
            )
        return self._client

    def _log(self, entry: Any) -> None:
        print(
            f"msbx: debug: {entry.method} {entry.url} -> {entry.status} request-id={entry.request_id} "
            f"{entry.elapsed_ms:.0f} ms" + (f" (attempt {entry.attempt + 1})" if entry.attempt else ""),
            file=sys.stderr,
        )

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    # ----- output -----------------------------------------------------------------------------
    def emit(self, rows: Any, columns: Sequence[str]) -> None:
        """A listing or one object, as a table (default) or JSON (``--output json``)."""
        if self.args.output == "json":
            print(json.dumps(rows, indent=2, sort_keys=True, default=str))
            return
        if isinstance(rows, dict):
            width = max(len(k) for k in rows) if rows else 0
            for key, value in rows.items():
                if isinstance(value, (dict, list)):
                    value = json.dumps(value, default=str)
                print(f"{key.ljust(width)}  {'' if value is None else value}")
            return
        table = [[_cell(row.get(c)) for c in columns] for row in rows]
        widths = [max([len(c)] + [len(r[i]) for r in table]) for i, c in enumerate(columns)]
        print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
        for row in table:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())

    def progress(self, label: str) -> Callable[[dict[str, Any]], None] | None:
        if self.args.output == "json" or self.args.quiet:
            return None
        return _OperationProgress(label)

    # ----- helpers ------------------------------------------------------------------------------
    def sandbox(self, ref: str) -> Sandbox:
        """A VM by id or exact name (``Client.sandbox``)."""
        return self.client.sandbox(ref)

    def finish(self, op: Operation, label: str) -> None:
        if not self.args.no_wait:
            op.wait(timeout=self.args.wait_timeout, on_progress=self.progress(label))
        if self.args.output == "json":
            print(json.dumps(op.data, indent=2, sort_keys=True, default=str))
        elif not self.args.quiet:
            print(f"{label}: {op.status} (operation {op.id})")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)


class _OperationProgress:
    """One line on stderr per change of an operation's status or progress."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()
        self.last = ""

    def __call__(self, op: dict[str, Any]) -> None:
        line = f"{self.label}: {op.get('status')} {op.get('progress') or 0}%"
        if line == self.last:
            return
        self.last = line
        if self.tty:
            sys.stderr.write("\r\033[K" + line + ("\n" if op.get("status") in ("succeeded", "failed") else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


class _TransferProgress:
    """A progress bar on stderr for transfers over 1 MiB (when stderr is a terminal)."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled and sys.stderr.isatty()
        self.started = time.monotonic()
        self.last_draw = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        if not self.enabled or (total is not None and total < (1 << 20)):
            return
        now = time.monotonic()
        if now - self.last_draw < 0.1 and done != total:
            return
        self.last_draw = now
        rate = done / max(now - self.started, 1e-6)
        if total:
            filled = int(30 * done / total)
            bar = "#" * filled + "-" * (30 - filled)
            text = f"{self.label} [{bar}] {done * 100 // total:3d}% {_size(done)}/{_size(total)} {_size(rate)}/s"
        else:
            text = f"{self.label} {_size(done)} {_size(rate)}/s"
        sys.stderr.write("\r\033[K" + text)
        if total is not None and done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# ----- commands -------------------------------------------------------------------------------
VM_COLUMNS = ("id", "name", "state", "vcpus", "memory_mib", "template", "owner")
OP_COLUMNS = ("id", "action", "status", "progress", "vm", "created_at")
SNAPSHOT_COLUMNS = ("id", "name", "vm", "state", "include_memory", "size_bytes", "created_at")
PF_COLUMNS = ("id", "protocol", "host_port", "guest_port", "address")


def cmd_login(cli: Cli) -> int:
    import getpass

    args = cli.args
    url = args.url or os.environ.get("MSBX_URL") or input("Server URL: ").strip()
    token = args.token or os.environ.get("MSBX_TOKEN") or getpass.getpass("API token: ").strip()
    with Client(url, token, timeout=args.timeout, on_response=cli._log if cli.debug else None) as client:
        me = client.me()
    path = config_save_profile(args.profile or "default", url=url, token=token, make_default=True)
    print(f"Logged in to {url} as {me.get('username')} (profile {args.profile or 'default'} in {path})")
    return 0


def cmd_vm_ls(cli: Cli) -> int:
    rows = [sb.data for sb in cli.client.sandboxes(state=cli.args.state, name=cli.args.name)]
    cli.emit(rows, VM_COLUMNS)
    return 0


def cmd_vm_create(cli: Cli) -> int:
    args = cli.args
    sandbox = cli.client.create_sandbox(
        template=args.template,
        name=args.name,
        vcpus=args.vcpus,
        memory_mib=args.memory,
        disk_gib=args.disk,
        start=not args.no_start,
        wait=not args.no_wait,
        timeout=args.wait_timeout,
        on_progress=cli.progress("create"),
        host=args.host,
        anti_affinity=args.anti_affinity,
        project=args.project,
    )
    cli.emit(sandbox.data, VM_COLUMNS)
    return 0


def cmd_vm_show(cli: Cli) -> int:
    cli.emit(cli.sandbox(cli.args.vm).data, VM_COLUMNS)
    return 0


def _vm_action(name: str) -> Callable[[Cli], int]:
    def run(cli: Cli) -> int:
        sandbox = cli.sandbox(cli.args.vm)
        method = getattr(sandbox, name)
        op = method(force=True) if getattr(cli.args, "force", False) else method()
        cli.finish(op, name)
        return 0

    return run


def cmd_vm_resize(cli: Cli) -> int:
    if cli.args.vcpus is None and cli.args.memory is None:
        raise SandboxError("give --vcpus and/or --memory")
    op = cli.sandbox(cli.args.vm).resize(vcpus=cli.args.vcpus, memory_mib=cli.args.memory)
    cli.finish(op, "resize")
    return 0


def cmd_vm_move(cli: Cli) -> int:
    cli.finish(cli.sandbox(cli.args.vm).move(cli.args.host), f"move to {cli.args.host}")
    return 0


def cmd_vm_rm(cli: Cli) -> int:
    for ref in cli.args.vm:
        cli.finish(cli.sandbox(ref).delete(), f"delete {ref}")
    return 0


def cmd_exec(cli: Cli) -> int:
    args = cli.args
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise SandboxError("no command: msbx exec VM -- CMD [ARGS...]")
    env = dict(_key_value(item) for item in args.env or ())
    sandbox = cli.sandbox(args.vm)
    if args.tty:
        return _exec_tty(sandbox, command, env, args)
    cmd: Any = command[0] if len(command) == 1 and " " in command[0] else command
    stdin = None if sys.stdin.isatty() or not args.stdin else sys.stdin.read()
    out, err = sys.stdout, sys.stderr
    result = sandbox.exec(
        cmd,
        env=env or None,
        cwd=args.cwd,
        user=args.user,
        timeout=args.cmd_timeout,
        stdin=stdin,
        on_stdout=lambda text: (out.write(text), out.flush()),
        on_stderr=lambda text: (err.write(text), err.flush()),
    )
    if cli.debug:
        print(f"msbx: debug: exec {result.exec_id} ended {result.raw}", file=sys.stderr)
    return _exit_status(result)


def _exit_status(result: Any) -> int:
    if result.timed_out:
        return EXIT_TIMED_OUT
    if result.exit_code is not None:
        return int(result.exit_code)
    name = str(result.signal or "")
    number = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
    return 128 + int(number) if number is not None else 1


def _key_value(item: str) -> tuple:
    if "=" not in item:
        raise SandboxError(f"--env wants KEY=VALUE, not {item!r}")
    key, value = item.split("=", 1)
    return key, value


class _RawTerminal:
    """stdin in raw mode (restored on exit) when it is a terminal."""

    def __init__(self) -> None:
        self.fd = sys.stdin.fileno()
        self.saved: Any = None

    def __enter__(self) -> _RawTerminal:
        if os.isatty(self.fd):
            import termios
            import tty

            self.saved = termios.tcgetattr(self.fd)
            # TCSANOW, not setraw's default TCSAFLUSH: keys typed ahead are kept, not discarded.
            tty.setraw(self.fd, termios.TCSANOW)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)


def _terminal_size() -> tuple:
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
    except OSError:
        return 24, 80
    # A terminal that reports no size (0 x 0, e.g. a fresh pseudo-terminal) gets the classic one.
    return size.lines or 24, size.columns or 80


def _exec_tty(sandbox: Sandbox, command: list[str], env: dict[str, str], args: argparse.Namespace) -> int:
    import select
    import threading

    rows, cols = _terminal_size()
    cmd: Any = command[0] if len(command) == 1 else command
    session = sandbox.pty(cmd, rows=rows, cols=cols, env=env or None, cwd=args.cwd, user=args.user)
    resized = threading.Event()
    previous = signal.signal(signal.SIGWINCH, lambda *_: resized.set()) if hasattr(signal, "SIGWINCH") else None
    done = threading.Event()

    def pump_output() -> None:
        try:
            while True:
                data = session.recv()
                if data is None:
                    return
                os.write(sys.stdout.fileno(), data)
        finally:
            done.set()

    reader = threading.Thread(target=pump_output, daemon=True)
    stdin_fd = sys.stdin.fileno()
    try:
        with _RawTerminal():
            reader.start()
            while not done.is_set():
                if resized.is_set():
                    resized.clear()
                    session.resize(*_terminal_size())
                ready, _, _ = select.select([stdin_fd], [], [], 0.2)
                if ready:
                    data = os.read(stdin_fd, 4096)
                    if not data:
                        session.ws.send(json.dumps({"type": "eof"}))
                        done.wait()
                        break
                    session.send(data)
            reader.join(timeout=5)
    finally:
        if previous is not None:
            signal.signal(signal.SIGWINCH, previous)
        session.close()
    if session.result is None:
        raise SandboxError("the exec stream ended without a result")
    return _exit_status(session.result)


def _detach_byte(spec: str) -> int:
    if len(spec) == 2 and spec[0] == "^":
        return ord(spec[1].upper()) ^ 0x40
    if len(spec) == 1:
        return ord(spec)
    raise SandboxError(f"--detach-key wants a character or ^X, not {spec!r}")


def cmd_console(cli: Cli) -> int:
    import select
    import threading

    sandbox = cli.sandbox(cli.args.vm)
    detach = _detach_byte(cli.args.detach_key)
    console = sandbox.console()
    interactive = sys.stdin.isatty()
    done = threading.Event()
    failure: list[BaseException] = []

    def pump_output() -> None:
        try:
            while not done.is_set():
                data = console.recv()
                if data is None:
                    return
                os.write(sys.stdout.fileno(), data)
        except BaseException as exc:  # shown after the terminal is restored
            failure.append(exc)
        finally:
            done.set()

    reader = threading.Thread(target=pump_output, daemon=True)
    stdin_fd = sys.stdin.fileno()
    try:
        with _RawTerminal():
            if not cli.args.quiet:  # once in raw mode: from here on keystrokes reach the console
                mode = "read-only" if cli.args.read_only else "read-write"
                sys.stderr.write(f"Connected to {sandbox.name} ({mode}); escape character is {cli.args.detach_key}\r\n")
                sys.stderr.flush()
            reader.start()
            while not done.is_set():
                ready, _, _ = select.select([stdin_fd], [], [], 0.2)
                if not ready:
                    continue
                data = os.read(stdin_fd, 4096)
                if not data:  # stdin closed: keep watching in read-only fashion until detached
                    if interactive:
                        break
                    done.wait()
                    break
                if detach in data:
                    data = data[: data.index(detach)]
                    if data and not cli.args.read_only:
                        console.send(data)
                    break
                if not cli.args.read_only:
                    console.send(data)
    finally:
        done.set()
        console.close()
    if not cli.args.quiet:
        sys.stderr.write("\r\nDetached.\r\n" if not failure else "\r\n")
    if failure and not isinstance(failure[0], (ConnectionError,)):
        raise failure[0]
    return 0


def _split_remote(spec: str) -> tuple:
    """``VM:/path`` -> (VM, /path); a local path -> (None, path). ``./x:y`` stays local."""
    if ":" in spec and not spec.startswith(("/", ".")):
        vm, path = spec.split(":", 1)
        if vm and path:
            return vm, path
    return None, spec


def cmd_cp(cli: Cli) -> int:
    src_vm, src = _split_remote(cli.args.src)
    dst_vm, dst = _split_remote(cli.args.dst)
    show = not cli.args.quiet and cli.args.output != "json"
    if src_vm and dst_vm:
        raise SandboxError("copy between two VMs: copy to a local file first")
    if not src_vm and not dst_vm:
        raise SandboxError("one side is VM:/path")
    if dst_vm:
        sandbox = cli.sandbox(dst_vm)
        if dst.endswith("/"):
            dst += os.path.basename(src)
        source: Any = sys.stdin.buffer if src == "-" else src
        result = sandbox.files.write(
            dst,
            source,
            mode=int(cli.args.mode, 8) if cli.args.mode else None,
            on_progress=_TransferProgress(f"{src} -> {dst_vm}:{dst}", show),
        )
    else:
        sandbox = cli.sandbox(src_vm)  # type: ignore[arg-type]
        if dst == "-":
            result = sandbox.files.download(src, sys.stdout.buffer)
            sys.stdout.flush()
            return 0
        if os.path.isdir(dst):
            dst = os.path.join(dst, os.path.basename(src.rstrip("/")))
        result = sandbox.files.download(src, dst, on_progress=_TransferProgress(f"{src_vm}:{src} -> {dst}", show))
    if cli.args.output == "json":
        print(json.dumps(result.__dict__, indent=2, sort_keys=True))
    elif not cli.args.quiet:
        print(f"{result.size} bytes, sha256 {result.sha256}")
    return 0


def cmd_snapshot_ls(cli: Cli) -> int:
    vm = cli.sandbox(cli.args.vm).id if cli.args.vm else None
    cli.emit([s.data for s in cli.client.snapshots(vm=vm)], SNAPSHOT_COLUMNS)
    return 0


def cmd_snapshot_create(cli: Cli) -> int:
    sandbox = cli.sandbox(cli.args.vm)
    snap = sandbox.snapshot(
        cli.args.name,
        description=cli.args.description or "",
        include_memory=not cli.args.disk_only,
        wait=False,
    )
    if snap.operation is not None and not cli.args.no_wait:
        snap.operation.wait(timeout=cli.args.wait_timeout, on_progress=cli.progress("snapshot"))
        snap.refresh()
    cli.emit(snap.data, SNAPSHOT_COLUMNS)
    return 0


def cmd_snapshot_show(cli: Cli) -> int:
    cli.emit(cli.client.snapshot(cli.args.snapshot).data, SNAPSHOT_COLUMNS)
    return 0


def cmd_snapshot_restore(cli: Cli) -> int:
    cli.finish(cli.client.snapshot(cli.args.snapshot).restore(), "restore")
    return 0


def cmd_snapshot_clone(cli: Cli) -> int:
    snap = cli.client.snapshot(cli.args.snapshot)
    clones = snap.clone(cli.args.count, name_prefix=cli.args.prefix, wait=False)
    if not cli.args.no_wait:
        for sandbox in clones:
            sandbox.wait_ready(timeout=cli.args.wait_timeout, on_progress=cli.progress(f"clone {sandbox.name}"))
    cli.emit([sb.refresh().data if not cli.args.no_wait else sb.data for sb in clones], VM_COLUMNS)
    return 0


def cmd_snapshot_rm(cli: Cli) -> int:
    for ref in cli.args.snapshot:
        snap = cli.client.snapshot(ref)
        snap.delete()
        if not cli.args.quiet:
            print(f"delete {ref}: {snap.state}")
    return 0


def cmd_pf_ls(cli: Cli) -> int:
    cli.emit(cli.sandbox(cli.args.vm).port_forwards.list(), PF_COLUMNS)
    return 0


def cmd_pf_add(cli: Cli) -> int:
    forward = cli.sandbox(cli.args.vm).port_forwards.create(
        cli.args.guest_port, host_port=cli.args.host_port, protocol=cli.args.protocol
    )
    cli.emit(forward, PF_COLUMNS)
    return 0


def cmd_pf_rm(cli: Cli) -> int:
    cli.sandbox(cli.args.vm).port_forwards.delete(cli.args.id)
    return 0


def cmd_ops_ls(cli: Cli) -> int:
    vm = cli.sandbox(cli.args.vm).id if cli.args.vm else None
    rows = []
    for op in cli.client.operations(vm=vm):
        rows.append(op.data)
        if len(rows) >= cli.args.limit:
            break
    cli.emit(rows, OP_COLUMNS)
    return 0


def cmd_ops_watch(cli: Cli) -> int:
    op = cli.client.operation(cli.args.operation)
    printed = [0]

    def show(data: dict[str, Any]) -> None:
        log = data.get("log") or ""
        if cli.args.output != "json" and len(log) > printed[0]:
            sys.stdout.write(log[printed[0] :] if log[printed[0] :].endswith("\n") else log[printed[0] :] + "\n")
            sys.stdout.flush()
            printed[0] = len(log)
        progress = cli.progress(f"{data.get('action')} {data.get('id')}")
        if progress is not None:
            progress(data)

    op.wait(timeout=cli.args.wait_timeout, on_progress=show)
    if cli.args.output == "json":
        print(json.dumps(op.data, indent=2, sort_keys=True, default=str))
    return 0


def cmd_completion(cli: Cli) -> int:
    print(completion_script(build_parser(), cli.args.shell))
    return 0


# ----- parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: an option given after the subcommand is not reset by the subparser's default.
    common.add_argument("-o", "--output", choices=("table", "json"), default=argparse.SUPPRESS, help="output format")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="print less")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="log requests and ids")
    S = argparse.SUPPRESS
    common.add_argument("--url", default=S, help="server URL (default: MSBX_URL, then the profile)")
    common.add_argument("--token", default=S, help="API token (default: MSBX_TOKEN, then the profile)")
    common.add_argument("--profile", default=S, help="config profile (default: MSBX_PROFILE, then the default)")
    common.add_argument("--timeout", type=float, default=S, help="seconds per request (default 30)")

    parser = argparse.ArgumentParser(
        prog="msbx", description="Command-line client of microvm-sandbox (docs/cli.md).", parents=[common]
    )
    parser.add_argument("--version", action="version", version=f"msbx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def command(group: Any, name: str, func: Callable[[Cli], int], help: str, **kw: Any) -> argparse.ArgumentParser:
        p = group.add_parser(name, help=help, description=help, parents=[common], **kw)
        p.set_defaults(func=func)
        return p

    def waits(p: argparse.ArgumentParser) -> None:
        p.add_argument("--no-wait", action="store_true", help="return once the operation is queued")
        p.add_argument("--wait-timeout", type=float, default=600.0, help="seconds to wait (default 600)")

    p = command(sub, "login", cmd_login, "store a server URL and token in the config file (0600)")

    vm = sub.add_parser("vm", help="VMs: ls, create, show, start, stop, ...").add_subparsers(dest="vm_command")
    vm.required = True
    p = command(vm, "ls", cmd_vm_ls, "list VMs")
    p.add_argument("--state")
    p.add_argument("--name", help="name contains")
    p = command(vm, "create", cmd_vm_create, "create (and start) a VM")
    p.add_argument("--template", "-t", default="linux-default")
    p.add_argument("--name", "-n")
    p.add_argument("--vcpus", type=int)
    p.add_argument("--memory", type=int, help="MiB")
    p.add_argument("--disk", type=int, help="GiB")
    p.add_argument("--no-start", action="store_true")
    p.add_argument("--host", help="operators: place the VM on this host")
    p.add_argument("--anti-affinity", action="store_true", help="not on a host holding another of your VMs")
    p.add_argument("--project", help="id or slug of the project the VM goes into")
    waits(p)
    p = command(vm, "show", cmd_vm_show, "show a VM")
    p.add_argument("vm", help="id or name")
    for name in ("start", "stop", "reboot", "pause", "resume"):
        p = command(vm, name, _vm_action(name), f"{name} a VM")
        p.add_argument("vm", help="id or name")
        if name in ("stop", "reboot"):
            p.add_argument("--force", action="store_true", help="no graceful shutdown")
        waits(p)
    p = command(vm, "resize", cmd_vm_resize, "change vCPUs and/or memory")
    p.add_argument("vm")
    p.add_argument("--vcpus", type=int)
    p.add_argument("--memory", type=int, help="MiB")
    waits(p)
    p = command(vm, "move", cmd_vm_move, "operators: move a VM to another host (a running one restarts there)")
    p.add_argument("vm")
    p.add_argument("host", help="the name of the host")
    waits(p)
    p = command(vm, "rm", cmd_vm_rm, "delete VMs")
    p.add_argument("vm", nargs="+")
    waits(p)

    p = command(sub, "exec", cmd_exec, "run a command in a VM: msbx exec VM -- CMD [ARGS...]")
    p.add_argument("-t", "--tty", action="store_true", help="interactive, on a pseudo-terminal")
    p.add_argument("-i", "--stdin", action="store_true", help="send this program's stdin (not with -t)")
    p.add_argument("-e", "--env", action="append", metavar="KEY=VALUE")
    p.add_argument("-w", "--cwd")
    p.add_argument("-u", "--user")
    p.add_argument("--cmd-timeout", type=float, help="kill the command after this many seconds (exit 124)")
    p.add_argument("vm")
    p.add_argument("command", nargs=argparse.REMAINDER)

    p = command(sub, "console", cmd_console, "attach to the serial console (detach with ^])")
    p.add_argument("vm")
    p.add_argument("--read-only", "-r", action="store_true", help="never send keystrokes")
    p.add_argument("--detach-key", default=DETACH_DEFAULT, help="detach character (default ^])")

    p = command(sub, "cp", cmd_cp, "copy files: msbx cp LOCAL VM:/path, msbx cp VM:/path LOCAL ('-': stdio)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--mode", help="octal mode of an uploaded file, e.g. 0644")

    snap = sub.add_parser("snapshot", help="snapshots: ls, create, show, restore, clone, rm").add_subparsers(
        dest="snapshot_command"
    )
    snap.required = True
    p = command(snap, "ls", cmd_snapshot_ls, "list snapshots (of one VM)")
    p.add_argument("vm", nargs="?")
    p = command(snap, "create", cmd_snapshot_create, "snapshot a VM")
    p.add_argument("vm")
    p.add_argument("--name", "-n")
    p.add_argument("--description")
    p.add_argument("--disk-only", action="store_true", help="without memory")
    waits(p)
    p = command(snap, "show", cmd_snapshot_show, "show a snapshot")
    p.add_argument("snapshot")
    p = command(snap, "restore", cmd_snapshot_restore, "put the snapshot's VM back to it")
    p.add_argument("snapshot")
    waits(p)
    p = command(snap, "clone", cmd_snapshot_clone, "new VMs from a snapshot")
    p.add_argument("snapshot")
    p.add_argument("--count", "-c", type=int, default=1)
    p.add_argument("--prefix")
    waits(p)
    p = command(snap, "rm", cmd_snapshot_rm, "delete snapshots")
    p.add_argument("snapshot", nargs="+")

    pf = sub.add_parser("port-forward", help="port forwards: ls, add, rm").add_subparsers(dest="pf_command")
    pf.required = True
    p = command(pf, "ls", cmd_pf_ls, "list a VM's port forwards")
    p.add_argument("vm")
    p = command(pf, "add", cmd_pf_add, "forward a host port to a guest port")
    p.add_argument("vm")
    p.add_argument("guest_port", type=int)
    p.add_argument("--host-port", type=int)
    p.add_argument("--protocol", choices=("tcp", "udp"), default="tcp")
    p = command(pf, "rm", cmd_pf_rm, "remove a port forward")
    p.add_argument("vm")
    p.add_argument("id")

    ops = sub.add_parser("ops", help="operations: ls, watch").add_subparsers(dest="ops_command")
    ops.required = True
    p = command(ops, "ls", cmd_ops_ls, "recent operations")
    p.add_argument("--vm")
    p.add_argument("--limit", type=int, default=50)
    p = command(ops, "watch", cmd_ops_watch, "follow an operation's progress and log until it ends")
    p.add_argument("operation")
    p.add_argument("--wait-timeout", type=float, default=3600.0)

    p = command(sub, "completion", cmd_completion, "print a shell completion script (bash or zsh)")
    p.add_argument("shell", choices=("bash", "zsh"))
    return parser


def _command_tree(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """{command: {subcommand: [options]}} from the parser, for the completion scripts."""

    def options(p: argparse.ArgumentParser) -> list[str]:
        return sorted(o for a in p._actions for o in a.option_strings if o.startswith("--"))

    tree: dict[str, Any] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                nested = [a for a in child._actions if isinstance(a, argparse._SubParsersAction)]
                if nested:
                    tree[name] = {n: options(c) for n, c in nested[0].choices.items()}
                else:
                    tree[name] = options(child)
    tree["__global__"] = options(parser)
    return tree


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    tree = _command_tree(parser)
    global_opts = " ".join(tree.pop("__global__"))
    cases = []
    for name, sub in sorted(tree.items()):
        if isinstance(sub, dict):
            cases.append(f'        {name}) words="{" ".join(sorted(sub))}";;')
            for child, opts in sorted(sub.items()):
                cases.append(f'        {name}/{child}) words="{" ".join(opts)}";;')
        else:
            cases.append(f'        {name}) words="{" ".join(sub)}";;')
    body = "\n".join(cases)
    script = f"""# msbx completion ({shell}): eval "$(msbx completion {shell})"
_msbx_complete() {{
    local cur words key i
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    key=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in
            -*) ;;
            *) if [ -z "$key" ]; then key="${{COMP_WORDS[i]}}"; elif [ "${{key#*/}}" = "$key" ]; then
                   key="$key/${{COMP_WORDS[i]}}"; fi;;
        esac
    done
    case "$key" in
        "") words="{" ".join(sorted(tree))} {global_opts}";;
{body}
        *) words="";;
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -o default -F _msbx_complete msbx
"""
    if shell == "zsh":
        script = "autoload -U +X bashcompinit && bashcompinit\n" + script
    return script


def main(argv: Iterable[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    defaults = {"output": "table", "quiet": False, "debug": False, "url": None, "token": None, "profile": None}
    for name, default in (*defaults.items(), ("timeout", 30.0)):
        if not hasattr(args, name):
            setattr(args, name, default)
    for name, default in (("no_wait", False), ("wait_timeout", 600.0)):
        if not hasattr(args, name):
            setattr(args, name, default)
    cli = Cli(args)
    try:
        return args.func(cli)
    except KeyboardInterrupt:
        print("msbx: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except SandboxError as exc:
        print(f"msbx: error: {_one_line(exc)}", file=sys.stderr)
        if isinstance(exc, ApiError) and exc.request_id and cli.debug:
            print(f"msbx: debug: request-id {exc.request_id} ({exc.method} {exc.url})", file=sys.stderr)
        return exc.exit_code
    finally:
        cli.close()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:500] if text else type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
