"""The web process freezes its start-up objects (sandbox_site/gc_freeze.py): Python's full
collections then skip them, and no longer stop every request of the process for 100-170 ms
every 10-12 s under load (benchmarks/api.py --rate, docs/benchmarks.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import gc, time
import sandbox_site.asgi  # what daphne imports
frozen = gc.get_freeze_count()
tracked = len(gc.get_objects())
started = time.perf_counter()
gc.collect(2)
print(frozen, tracked, round((time.perf_counter() - started) * 1000, 1))
"""


def test_the_web_entry_point_freezes_what_start_up_built_and_full_collections_skip_it() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    frozen, tracked, _full_ms = out.stdout.split()[-3:]
    # Django, DRF, Channels and the URL patterns: far more than what is still collected.
    assert int(frozen) > 50_000, out.stdout
    assert int(tracked) < int(frozen) // 5, out.stdout


def test_a_celery_worker_freezes_its_start_up_objects_before_the_pool_forks() -> None:
    """worker_init runs in the worker's main process before the prefork pool starts: frozen
    objects are left alone by the pool processes' full collections, so their pages stay shared."""
    from celery import signals

    from sandbox_site import celery as worker_app

    receivers = signals.worker_init._live_receivers(None)
    assert worker_app._worker_freeze_startup_objects in receivers
