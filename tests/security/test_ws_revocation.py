"""Rights are re-checked on open websockets: a revoked token, a removed share or a deactivated
user closes console, exec and events websockets within seconds (an event pushed to the user's
rights group by the service that changed the rights, and a periodic re-check)."""

from __future__ import annotations

import time

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from guardian.shortcuts import assign_perm

from accounts import services
from sandbox_site.asgi import application
from tests.factories import UserFactory, VmFactory
from tests.vms.conftest import live_vm, vm_runtime  # noqa: F401 - fixtures
from tests.vms.test_console_consumer import console_vm, hello, hostd, make_vm, root  # noqa: F401 - fixtures

pytestmark = pytest.mark.django_db(transaction=True)
HEADERS = [(b"origin", b"http://localhost"), (b"host", b"localhost")]


async def _closed_within(comm, seconds: float) -> int:
    """The close code the server sent within ``seconds`` (other frames are skipped)."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "the websocket stayed open"
        try:
            frame = await comm.receive_output(timeout=left)
        except TimeoutError as exc:
            raise AssertionError("the websocket stayed open") from exc
        if frame["type"] == "websocket.close":
            await comm.disconnect()  # let the consumer finish (its database thread too)
            return frame.get("code")


async def _events_with_token(user):
    token, secret = await database_sync_to_async(services.token_create)(user=user, name="ws", actor=user)
    comm = WebsocketCommunicator(
        application, "/ws/vms/events/", headers=[(b"authorization", f"Bearer {secret}".encode())]
    )
    connected, _ = await comm.connect(timeout=10)
    assert connected
    return comm, token


async def test_revoking_a_token_closes_its_events_websocket(owner):
    comm, token = await _events_with_token(owner)
    await database_sync_to_async(services.token_revoke)(token=token, actor=owner)
    assert await _closed_within(comm, 5) == 4403


async def test_a_deactivated_user_is_closed_by_the_periodic_check(owner, settings):
    settings.SANDBOX_WS_RECHECK_SECONDS = 0.5
    comm, _ = await _events_with_token(owner)
    # Changed behind the services' back (a database edit): no event, the periodic check finds it.
    await database_sync_to_async(get_user_model().objects.filter(pk=owner.pk).update)(is_active=False)
    assert await _closed_within(comm, 5) == 4403


async def test_removing_a_share_ends_the_events_subscription(owner):
    grantee = await database_sync_to_async(UserFactory)(username="grantee")
    vm = await database_sync_to_async(VmFactory)(owner=owner)
    await database_sync_to_async(assign_perm)("vms.view_vm", grantee, vm)
    comm = WebsocketCommunicator(application, "/ws/vms/events/", headers=HEADERS)
    comm.scope["user"] = grantee
    assert (await comm.connect(timeout=10))[0]
    await comm.send_json_to({"subscribe": str(vm.pk)})
    assert await comm.receive_json_from(timeout=5) == {"subscribed": str(vm.pk)}
    await database_sync_to_async(services.object_perms_revoke)(obj=vm, perms=None, actor=owner, user=grantee)
    assert await comm.receive_json_from(timeout=5) == {"unsubscribed": str(vm.pk), "reason": "permission_denied"}
    await comm.disconnect()


async def test_removing_a_share_closes_the_console(console_vm, owner):  # noqa: F811
    grantee = await database_sync_to_async(UserFactory)(username="grantee")
    for perm in ("vms.view_vm", "vms.console_vm"):
        await database_sync_to_async(assign_perm)(perm, grantee, console_vm)
    comm = WebsocketCommunicator(application, f"/ws/vms/{console_vm.pk}/console/", headers=HEADERS)
    comm.scope["user"] = grantee
    assert (await comm.connect(timeout=10))[0]
    await hello(comm)
    await database_sync_to_async(services.object_perms_revoke)(obj=console_vm, perms=None, actor=owner, user=grantee)
    assert await _closed_within(comm, 5) == 4403


async def test_losing_the_console_right_gives_the_keyboard_up(console_vm, owner):  # noqa: F811
    grantee = await database_sync_to_async(UserFactory)(username="grantee")
    for perm in ("vms.view_vm", "vms.console_vm"):
        await database_sync_to_async(assign_perm)(perm, grantee, console_vm)
    comm = WebsocketCommunicator(application, f"/ws/vms/{console_vm.pk}/console/", headers=HEADERS)
    comm.scope["user"] = grantee
    assert (await comm.connect(timeout=10))[0]
    assert (await hello(comm))["writer"] is True
    await database_sync_to_async(services.object_perms_revoke)(
        obj=console_vm, perms=["console_vm"], actor=owner, user=grantee
    )
    deadline = time.monotonic() + 5
    while True:
        frame = await comm.receive_output(timeout=max(0.1, deadline - time.monotonic()))
        if frame.get("text") and '"role"' in frame["text"]:
            assert '"writer": false' in frame["text"]
            break
    await comm.send_to(bytes_data=b"typed\n")
    await comm.disconnect()
    assert b"typed" not in console_vm.vmm.log.read_bytes()


async def test_removing_the_exec_right_closes_the_exec_websocket(owner, live_vm):  # noqa: F811
    from vms import exec_services

    vm, _ = live_vm
    grantee = await database_sync_to_async(UserFactory)(username="grantee")
    for perm in ("vms.view_vm", "vms.exec_vm"):
        await database_sync_to_async(assign_perm)(perm, grantee, vm)
    exec_id = (
        await database_sync_to_async(exec_services.vm_exec_start)(vm=vm, actor=owner, command="sleep 30", wait=False)
    )["exec_id"]
    comm = WebsocketCommunicator(application, f"/ws/vms/{vm.pk}/execs/{exec_id}/", headers=HEADERS)
    comm.scope["user"] = grantee
    assert (await comm.connect(timeout=10))[0]
    await database_sync_to_async(services.object_perms_revoke)(obj=vm, perms=["exec_vm"], actor=owner, user=grantee)
    assert await _closed_within(comm, 5) == 4403
