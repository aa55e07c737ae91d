"""scripts/run.sh (what `make run` ends with), with its processes replaced by stand-ins: it
prints the "is running" address only once the web server accepts connections there. The real
stack under run.sh is tested in tests/system/test_embedded.py."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# daphne's stand-in: listens on its -b/-p address (or accepts on the socket it was handed,
# ``-e fd:fileno=N``) only after a delay, as daphne does while it imports the project.
_SLOW_WEB = """#!{python}
import socket, sys, time
args = sys.argv[1:]
time.sleep(4)
if "-e" in args:
    server = socket.socket(fileno=int(args[args.index("-e") + 1].split("=")[1]))
else:
    server = socket.create_server((args[args.index("-b") + 1], int(args[args.index("-p") + 1])))
while True:
    conn, _ = server.accept()
    conn.close()
"""
_IDLE = "#!/bin/sh\nexec sleep 300\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    for name in ("run.sh", "logpipe.py", "web.py"):
        shutil.copy2(ROOT / "scripts" / name, root / "scripts" / name)
    (root / "manage.py").write_text("import time\ntime.sleep(300)\n")  # hostd's stand-in
    venv = root / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')  # this venv's
    (venv / "celery").write_text(_IDLE)
    (venv / "daphne").write_text(_SLOW_WEB.format(python=sys.executable))
    for name in ("python", "celery", "daphne"):
        (venv / name).chmod(0o755)
    return root


@pytest.mark.parametrize("web_processes", ["1", "2"])
def test_it_announces_the_address_only_once_the_web_server_answers(tmp_path, web_processes):
    root = _checkout(tmp_path)
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_")},
        "PYTHONPATH": str(ROOT),
        "SECRET_KEY": "test-only",
        "SANDBOX_ENV_FILE": "/nonexistent",
        "SANDBOX_DATA_DIR": str(tmp_path / "data"),
        "SANDBOX_NETNS": "",  # stand-ins only: no namespace to create
        "REDIS_URL": "redis://127.0.0.1:1/0",  # set: no private Redis is started
        "BIND": "127.0.0.1",
        "PORT": str(port),
        "WEB_PROCESSES": web_processes,
    }
    proc = subprocess.Popen(
        ["bash", str(root / "scripts" / "run.sh")],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        lines = []
        for line in proc.stdout:  # run.sh stays in the foreground: read up to the announcement
            lines.append(line)
            if "is running" in line:
                break
        assert any(f"http://127.0.0.1:{port}/" in line for line in lines), lines
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # refused without the wait: the address was printed before anything listened
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
