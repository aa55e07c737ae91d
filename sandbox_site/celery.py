import atexit
import os
import shutil
import sys
import tempfile

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sandbox_site.settings")

# A worker's pool processes share their metrics through prometheus_client's multiprocess mode,
# which reads this variable when prometheus_client is first imported: a fresh directory per
# worker (unless one is given), set before anything imports it. The main process serves them.
_METRICS_DIR_OWNER = 0
if "worker" in sys.argv[1:] and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="msbx-worker-metrics-")
    _METRICS_DIR_OWNER = os.getpid()

    @atexit.register
    def _metrics_dir_remove() -> None:
        if os.getpid() == _METRICS_DIR_OWNER:  # not in pool processes
            shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


app = Celery("sandbox_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# Request ids and users travel in task headers (sandbox_site.logs).
from sandbox_site import logs as _logs  # noqa: E402,F401


@signals.worker_init.connect
def _worker_metrics_start(**kwargs) -> None:
    from django.conf import settings

    from sandbox_site.metrics import worker_metrics_serve

    worker_metrics_serve(settings.SANDBOX_WORKER_METRICS_PORT, settings.SANDBOX_METRICS_BIND)


@signals.worker_init.connect
def _worker_freeze_startup_objects(**kwargs) -> None:
    """Before the pool forks: the pool processes' full collections then leave the start-up
    objects they share with this process alone, so the pages holding them stay shared instead of
    being copied into each of them (sandbox_site/gc_freeze.py)."""
    from sandbox_site.gc_freeze import freeze_startup_objects

    freeze_startup_objects()


@signals.worker_process_shutdown.connect
def _worker_process_metrics_forget(pid=None, **kwargs) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())
