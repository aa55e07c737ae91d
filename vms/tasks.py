"""Celery tasks: thin wrappers that take ids and call one service."""

import logging
import threading
import time

from celery import shared_task
from celery.signals import worker_ready

from accounts.context import actor_context

logger = logging.getLogger(__name__)


@shared_task(acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def operation_run_task(operation_id: str) -> None:
    from vms.models import Operation
    from vms.operations import operation_execute

    request_id = Operation.objects.filter(pk=operation_id).values_list("request_id", flat=True).first() or ""
    with actor_context(request_id=request_id):
        operation_execute(operation_id)


@shared_task(ignore_result=True)
def vms_reconcile_task() -> None:
    from vms.operations import vms_reconcile
    from vms.services import local_host

    vms_reconcile(local_host())


@shared_task(ignore_result=True)
def hosts_check_task() -> None:
    from vms.operations import hosts_check

    hosts_check()


@shared_task(ignore_result=True)
def host_periodic_fanout_task(task_name: str, expires: float) -> None:
    from vms.hosts import host_periodic_fanout

    host_periodic_fanout(task_name=task_name, expires=expires)


@shared_task(ignore_result=True)
def vms_sample_task() -> None:
    from vms.sampling import vms_sample
    from vms.services import local_host

    vms_sample(local_host())


@worker_ready.connect
def _reconcile_on_start(sender=None, **kwargs) -> None:
    from vms.hooks import hook_run
    from vms.operations import vms_reconcile
    from vms.services import local_host

    try:
        vms_reconcile(local_host())
    except Exception:  # a failed first pass must not stop the worker; beat retries
        logger.exception("reconcile at worker start failed")
    try:
        # e.g. networking: our own leftover TAPs/bridges go, plumbed NICs come back.
        hook_run("host_worker_ready", host=local_host())
    except Exception:
        logger.exception("worker-start hooks failed")


@worker_ready.connect
def _heartbeat_start(sender=None, **kwargs) -> None:
    # The host's heartbeat comes from a thread of the worker's main process, not from a task:
    # a pool busy with long boots must not make its host look down.
    threading.Thread(target=_heartbeat_loop, name="msbx-host-heartbeat", daemon=True).start()
    # The image inventory has its own thread: hashing a new multi-GiB image takes a while, and
    # the heartbeat must not wait for it.
    threading.Thread(target=_inventory_loop, name="msbx-host-inventory", daemon=True).start()


def _heartbeat_loop() -> None:
    from django.conf import settings
    from django.db import connection
    from django.utils import timezone

    from vms.operations import host_heartbeat
    from vms.services import local_host

    while True:
        try:
            host_heartbeat(local_host(), timezone.now())
        except Exception:
            logger.warning("host heartbeat failed", exc_info=True)
        finally:
            connection.close()
        time.sleep(settings.SANDBOX_RECONCILE_SECONDS)


def _inventory_loop() -> None:
    from django.conf import settings
    from django.db import connection

    from vms.inventory import host_inventory_update
    from vms.services import local_host

    while True:
        try:
            host_inventory_update(local_host())
        except Exception:
            logger.warning("host image inventory failed", exc_info=True)
        finally:
            connection.close()
        time.sleep(settings.SANDBOX_INVENTORY_SECONDS)
