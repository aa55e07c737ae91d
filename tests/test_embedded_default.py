"""The embedded default's settings (nothing configured): SQLite in WAL with immediate write
transactions and a busy timeout, everything Redis-backed on the private Redis's Unix socket; and
manage.py commands that need no Redis work while none runs. The running stack is tested end to
end in tests/system/test_embedded.py."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_SHOW = """
import json
from sandbox_site import settings as s
print(json.dumps({
    "db": s.DATABASES["default"],
    "layer": s.CHANNEL_LAYERS["default"],
    "cache": s.CACHES["default"],
    "broker": s.CELERY_BROKER_URL,
}, default=str))
"""


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL") and not k.startswith("SANDBOX_")
    }
    env.update(SECRET_KEY="test-only", DEBUG="0", SANDBOX_ENV_FILE="/nonexistent", SANDBOX_DATA_DIR=str(data_dir))
    env.update(extra)
    return env


def _settings(env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _SHOW], cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=60
    )
    return json.loads(out.stdout)


def test_it_uses_sqlite_in_wal_with_immediate_transactions_and_the_private_redis(tmp_path):
    shown = _settings(_env(tmp_path))
    assert shown["db"]["ENGINE"] == "django.db.backends.sqlite3"
    options = shown["db"]["OPTIONS"]
    assert options["transaction_mode"] == "IMMEDIATE" and options["timeout"] >= 5
    assert "journal_mode=WAL" in options["init_command"]
    socket = tmp_path / "redis.sock"
    assert shown["layer"]["BACKEND"] == "channels_redis.core.RedisChannelLayer"
    assert shown["layer"]["CONFIG"]["hosts"] == [f"unix://{socket}"]
    assert shown["cache"]["BACKEND"] == "sandbox_site.redis_cache.SharedPoolRedisCache"
    assert shown["cache"]["LOCATION"] == f"unix://{socket}"
    assert shown["broker"] == f"redis+socket://{socket}"


def test_redis_url_and_the_socket_path_can_be_set(tmp_path):
    shown = _settings(_env(tmp_path, REDIS_URL="redis://127.0.0.1:6379/5"))
    assert shown["broker"] == shown["cache"]["LOCATION"] == "redis://127.0.0.1:6379/5"
    shown = _settings(_env(tmp_path, SANDBOX_REDIS_SOCKET="/run/msbx/redis.sock"))
    assert shown["broker"] == "redis+socket:///run/msbx/redis.sock"


def test_commands_that_need_no_redis_work_while_none_runs(tmp_path):
    env = _env(tmp_path)
    assert not (tmp_path / "redis.sock").exists()
    for command in (["migrate", "--noinput", "-v", "0"], ["bootstrap_admin"], ["audit_verify"]):
        done = subprocess.run(
            [sys.executable, "manage.py", *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
        # bootstrap_admin's rights event finds no Redis: one line, no traceback.
        assert "Traceback" not in done.stderr, (command, done.stderr[-2000:])
    with contextlib.closing(sqlite3.connect(tmp_path / "db.sqlite3")) as db:
        assert db.execute("pragma journal_mode").fetchone()[0] == "wal"
