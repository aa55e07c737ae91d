"""Celery tasks: thin wrappers that take ids and call one service."""

from celery import shared_task


@shared_task(acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def snapshot_delete_task(snapshot_id: str) -> None:
    from snapshots.lifecycle import snapshot_files_delete

    snapshot_files_delete(snapshot_id)


@shared_task(ignore_result=True)
def snapshot_retention_task() -> None:
    """Beat job, on each host's queue: apply retention to the snapshots this host holds."""
    from snapshots.services import retention_apply
    from vms.services import local_host

    retention_apply(host=local_host())


@shared_task(ignore_result=True)
def golden_maintain_task() -> None:
    """Beat job, on each host's queue: build missing or stale golden snapshots of this host."""
    from snapshots.golden import golden_maintain
    from vms.services import local_host

    golden_maintain(host=local_host())


@shared_task(acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def golden_copy_task(template_id: str, host_id: str) -> None:
    """On a control-plane worker (SANDBOX_TRANSFER_QUEUE): copy another host's golden snapshot
    of the template to the host (or have the host build its own)."""
    from snapshots.golden import golden_copy
    from vms.models import Host, Template

    template = Template.objects.select_related("image").filter(pk=template_id).first()
    host = Host.objects.filter(pk=host_id, is_active=True).first()
    if template is not None and host is not None:
        golden_copy(template=template, host=host)
