"""Celery tasks: thin wrappers that call one service."""

from celery import shared_task


@shared_task(ignore_result=True)
def audit_chain_seal_task() -> None:
    from accounts.audit import audit_chain_seal

    audit_chain_seal()
