"""Console sessions in the audit log: who, when, how long, bytes in and out, takeovers."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async

from accounts.models import AuditEvent
from tests.vms.test_console_consumer import (  # noqa: F401 - fixtures
    connect,
    console_vm,
    hello,
    hostd,
    make_vm,
    read_until,
    root,
)

pytestmark = pytest.mark.django_db(transaction=True)


async def test_a_console_session_records_bytes_in_and_out(console_vm, owner):  # noqa: F811
    comm, _, _ = await connect(console_vm, owner)
    start = await hello(comm)
    await comm.send_to(bytes_data=b"root\n")
    seen = await read_until(comm, b"echo: root\n")
    await comm.disconnect()
    rows = await database_sync_to_async(
        lambda: {r.action: r for r in AuditEvent.objects.filter(object_id=str(console_vm.pk))}
    )()
    assert rows["console.open"].actor_id == owner.pk
    close = rows["console.close"].after
    assert close["bytes_in"] == 5 and close["bytes_out"] >= len(seen) > 0 and close["writer"] is True
    assert "seconds" in close and start["writer"] is True
