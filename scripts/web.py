"""Runs the web server: WEB_PROCESSES daphne processes sharing one listening socket.

One daphne runs Python on one core at a time (the GIL), so on a host with several cores one
process is the API's limit. This opens the TCP socket once and starts N daphne processes that
all accept on it (``daphne -e fd:fileno=N``; the kernel hands each connection to one of them).
Several processes are fine for everything the web process does: websockets, console writer
claims, rate limits and caches live in Redis (the channel layer and the cache); only
``SANDBOX_EXEC_WAITS_PER_USER`` and the database pool (``DB_POOL_MAX_SIZE``) are per process,
as docs/configuration.md says. /metrics sums all of them (prometheus_client's multiprocess
mode in a fresh directory, as the Celery worker does).

With one process (``--processes 1``, or an IPv6 address: daphne adopts inherited sockets as
IPv4 only) it execs ``daphne -b BIND -p PORT`` as before. When any daphne ends, the others are
stopped and this exits with its status (systemd and scripts/run.sh restart or stop the whole);
SIGTERM/SIGINT stop them all (each gets SIGTERM, then SIGKILL after ``--stop-seconds``).

    python scripts/web.py --bind 127.0.0.1 --port 8000 [--processes N] [-- daphne options]

Imports nothing from Django (it only starts processes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

APPLICATION = "sandbox_site.asgi:application"
MAX_PROCESSES = 64
# The default's ceiling: each process may hold DB_POOL_MAX_SIZE (20) PostgreSQL connections, and
# 4 x 20 plus the workers' stays under PostgreSQL's default max_connections (100).
DEFAULT_MAX_PROCESSES = 4


def default_processes() -> int:
    """One per CPU this process may run on but one (left to PostgreSQL, the worker, hostd and
    the VMs: on a busy 2-core host a second daphne was slower, docs/benchmarks.md), at least 1
    and at most DEFAULT_MAX_PROCESSES."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus - 1, DEFAULT_MAX_PROCESSES))


def processes_wanted(value: str | None) -> int:
    """``WEB_PROCESSES``/``--processes``: empty or 0 = ``default_processes()``; 1..MAX_PROCESSES."""
    if value is None or value.strip() in ("", "0"):
        return default_processes()
    try:
        n = int(value)
    except ValueError:
        raise SystemExit(f"WEB_PROCESSES must be a whole number (0 = the default), not {value!r}") from None
    if not 0 < n <= MAX_PROCESSES:
        raise SystemExit(f"WEB_PROCESSES must be 0..{MAX_PROCESSES}, not {n}")
    return n


def _listen(bind: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((bind, port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def _stop(children: list[subprocess.Popen], seconds: float) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + seconds
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--processes", default=os.environ.get("WEB_PROCESSES"), help="0 = one per CPU but one, 1-4")
    parser.add_argument("--stop-seconds", type=float, default=25.0)
    parser.add_argument("daphne_args", nargs="*", help="more daphne options (after --)")
    args = parser.parse_args(argv)
    daphne = str(Path(sys.executable).parent / "daphne")
    n = processes_wanted(args.processes)
    if n == 1 or ":" in args.bind:
        os.execv(daphne, [daphne, "-b", args.bind, "-p", str(args.port), *args.daphne_args, APPLICATION])  # noqa: S606

    sock = _listen(args.bind, args.port)
    env = dict(os.environ)
    metrics_dir = None
    if not env.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = tempfile.mkdtemp(prefix="msbx-web-metrics-")
        env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    command = [daphne, "-e", f"fd:fileno={sock.fileno()}", *args.daphne_args, APPLICATION]
    children: list[subprocess.Popen] = []
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    status = 0
    try:
        for _ in range(n):
            children.append(subprocess.Popen(command, env=env, pass_fds=(sock.fileno(),)))
        print(f"web: {n} daphne processes on {args.bind}:{args.port}", file=sys.stderr, flush=True)
        while not stopping:
            ended = next((c for c in children if c.poll() is not None), None)
            if ended is not None:
                status = ended.returncode or 1
                print(f"web: daphne {ended.pid} ended ({ended.returncode}); stopping the others", file=sys.stderr)
                break
            time.sleep(0.5)
    finally:
        _stop(children, args.stop_seconds)
        sock.close()
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
