"""Celery tasks: thin wrappers that take ids and call one service. They run on the host's
own queue (``host.<name>``) because they change that host's interfaces and rules."""

from celery import shared_task


@shared_task(acks_late=True, ignore_result=True)
def network_rules_apply_task(host_id: str) -> None:
    from networking.services import network_rules_apply
    from vms.models import Host

    host = Host.objects.filter(pk=host_id).first()
    if host is not None:
        network_rules_apply(host=host)


@shared_task(acks_late=True, ignore_result=True)
def network_peers_sync_task(host_id: str) -> None:
    from networking.services import network_peers_sync
    from vms.models import Host

    host = Host.objects.filter(pk=host_id).first()
    if host is not None:
        network_peers_sync(host=host)


@shared_task(ignore_result=True)
def network_reconcile_task() -> None:
    from networking.services import network_reconcile
    from vms.services import local_host

    network_reconcile(host=local_host())
