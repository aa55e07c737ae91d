"""Health endpoints for load balancers, systemd and Prometheus (docs/operations.md).

- ``GET /healthz``: the process is alive and serves requests (no dependency is touched).
- ``GET /readyz``: this web process can do its work: the database, Redis (Celery's broker,
  the channel layer and the cache), this host's hostd, free space in the data directory and
  a guest image on disk. Answers 200 when every check passes, else 503; the body lists every
  check with ``ok``, ``detail`` and how long it took. Each check has a short timeout.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from django.conf import settings
from django.http import JsonResponse
from django.views.decorators.cache import never_cache

CHECK_TIMEOUT = 2.0


def _database() -> str:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return connection.vendor


def _redis() -> str:
    import redis

    client = redis.Redis.from_url(
        settings.REDIS_URL, socket_timeout=CHECK_TIMEOUT, socket_connect_timeout=CHECK_TIMEOUT
    )
    with client:
        client.ping()
    return "pong"


def _hostd() -> str:
    from vms.hostd.client import HostdClient

    with HostdClient(settings.SANDBOX_HOSTD_SOCKET, timeout=CHECK_TIMEOUT) as client:
        result, _ = client.call("hello", timeout=CHECK_TIMEOUT)
    return f"version {result.get('hostd_version')}, {result.get('vms')} VM(s) attached"


def _disk() -> str:
    where = Path(settings.DATA_DIR).absolute()
    while not where.exists() and where != where.parent:  # not created yet: its filesystem
        where = where.parent
    free = shutil.disk_usage(where).free
    need = settings.SANDBOX_READY_MIN_FREE_BYTES
    text = f"{free >> 20} MiB free in {settings.DATA_DIR}"
    if free < need:
        raise RuntimeError(f"{text}, needs {need >> 20} MiB")
    return text


def _image() -> str:
    from vms.models import Image

    ready = list(Image.objects.filter(status=Image.Status.READY).values_list("name", "kernel_path", "rootfs_path"))
    present = [
        name
        for name, kernel, rootfs in ready
        if kernel and rootfs and Path(kernel).is_file() and Path(rootfs).is_file()
    ]
    if not present:
        raise RuntimeError("no ready guest image is on disk (manage.py build_image)")
    return ", ".join(sorted(present))


CHECKS: dict[str, Callable[[], str]] = {
    "database": _database,
    "redis": _redis,
    "hostd": _hostd,
    "disk": _disk,
    "image": _image,
}


def readiness_checks() -> dict[str, dict]:
    """Run every check: ``{name: {"ok", "detail", "ms"}}``."""
    results = {}
    for name, check in CHECKS.items():
        started = time.monotonic()
        try:
            detail, ok = check(), True
        except Exception as exc:
            detail, ok = f"{type(exc).__name__}: {exc}"[:500], False
        results[name] = {"ok": ok, "detail": detail, "ms": round((time.monotonic() - started) * 1000, 1)}
    return results


@never_cache
def healthz(request):
    return JsonResponse({"ok": True})


@never_cache
def readyz(request):
    checks = readiness_checks()
    ready = all(c["ok"] for c in checks.values())
    return JsonResponse({"ready": ready, "checks": checks}, status=200 if ready else 503)
