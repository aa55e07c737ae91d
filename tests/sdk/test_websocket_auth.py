"""API tokens on websocket handshakes (``Authorization: Bearer``, as the SDK and ``msbx exec -t``
send them): the exec websocket sees the token's user; read-only and unknown tokens are anonymous."""

from __future__ import annotations

import pytest
from channels.testing import WebsocketCommunicator

from accounts.services import token_create
from sandbox_site.asgi import application
from tests.factories import UserFactory, VmFactory

pytestmark = pytest.mark.django_db(transaction=True)


async def _close_code(vm_id, headers) -> int:
    communicator = WebsocketCommunicator(
        application, f"/ws/vms/{vm_id}/execs/e1/", headers=[(b"host", b"127.0.0.1"), *headers]
    )
    connected, code = await communicator.connect(timeout=10)
    await communicator.disconnect()
    assert not connected
    return code


def _bearer(secret: str) -> list:
    return [(b"authorization", f"Bearer {secret}".encode())]


@pytest.fixture
def vm_and_tokens():
    owner = UserFactory(username="owner")
    stranger = UserFactory(username="stranger")
    vm = VmFactory(owner=owner, state="stopped")
    return vm, {
        "owner": token_create(user=owner, name="sdk", actor=owner)[1],
        "read_only": token_create(user=owner, name="ro", read_only=True, actor=owner)[1],
        "stranger": token_create(user=stranger, name="sdk", actor=stranger)[1],
    }


async def test_it_authenticates_the_exec_websocket_with_a_bearer_token(vm_and_tokens):
    vm, tokens = vm_and_tokens
    # The owner gets past authentication and permissions: the VM is stopped (4409).
    assert await _close_code(vm.pk, _bearer(tokens["owner"])) == 4409
    assert await _close_code(vm.pk, _bearer(tokens["stranger"])) == 4404


async def test_it_treats_read_only_unknown_and_missing_tokens_as_anonymous(vm_and_tokens):
    vm, tokens = vm_and_tokens
    assert await _close_code(vm.pk, _bearer(tokens["read_only"])) == 4401
    assert await _close_code(vm.pk, _bearer("msbx_not-a-token")) == 4401
    assert await _close_code(vm.pk, []) == 4401
