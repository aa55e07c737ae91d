"""Best-effort group events (sandbox_site.group_events): an unreachable channel layer costs one
log line without a traceback and no wait per later call; anything else logs its traceback."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis.exceptions

from sandbox_site import group_events


@pytest.fixture(autouse=True)
def _fresh_state():
    group_events.publish_reset()
    yield
    group_events.publish_reset()


class FakeLayer:
    def __init__(self, error: BaseException | None = None, hang: bool = False):
        self.error, self.hang, self.sent = error, hang, []

    async def group_send(self, group, message):
        self.sent.append((group, message))
        if self.hang:
            await asyncio.Event().wait()
        if self.error is not None:
            raise self.error


def _warnings(caplog):
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_it_sends_to_every_group(monkeypatch):
    layer = FakeLayer()
    monkeypatch.setattr(group_events, "get_channel_layer", lambda: layer)
    assert group_events.group_events_publish(["a", "b"], {"type": "x"}, what="test event")
    assert layer.sent == [("a", {"type": "x"}), ("b", {"type": "x"})]


def test_it_logs_an_unreachable_layer_once_without_traceback_and_skips_it_for_a_while(monkeypatch, caplog):
    layer = FakeLayer(error=redis.exceptions.ConnectionError("Error 2 connecting to /x/redis.sock."))
    monkeypatch.setattr(group_events, "get_channel_layer", lambda: layer)
    caplog.set_level(logging.DEBUG, logger="sandbox_site.group_events")
    for _ in range(5):
        assert not group_events.group_events_publish(["a", "b"], {"type": "x"}, what="test event")
    assert len(layer.sent) == 1  # the later calls did not try (nor wait) again
    [warning] = _warnings(caplog)
    assert warning.exc_info is None
    assert "channel layer unreachable" in warning.getMessage() and "test event" in warning.getMessage()
    group_events.publish_reset()  # as when the skip time is over
    group_events.group_events_publish(["a"], {"type": "x"}, what="test event")
    assert len(layer.sent) == 2


def test_it_bounds_a_layer_that_does_not_answer(monkeypatch, caplog):
    layer = FakeLayer(hang=True)
    monkeypatch.setattr(group_events, "get_channel_layer", lambda: layer)
    monkeypatch.setattr(group_events, "PUBLISH_TIMEOUT_SECONDS", 0.05)
    assert not group_events.group_events_publish(["a"], {"type": "x"}, what="test event")
    [warning] = _warnings(caplog)
    assert warning.exc_info is None and "unreachable" in warning.getMessage()


def test_it_logs_unexpected_errors_with_their_traceback_and_keeps_trying(monkeypatch, caplog):
    layer = FakeLayer(error=ValueError("message too large"))
    monkeypatch.setattr(group_events, "get_channel_layer", lambda: layer)
    group_events.group_events_publish(["a"], {"type": "x"}, what="test event")
    group_events.group_events_publish(["a"], {"type": "x"}, what="test event")
    assert len(layer.sent) == 2
    warnings = _warnings(caplog)
    assert len(warnings) == 2 and all(w.exc_info is not None for w in warnings)


def test_rights_and_vm_events_share_it_on_a_layer_without_socket(
    vm, owner, settings, tmp_path, caplog, django_capture_on_commit_callbacks
):
    """What bootstrap_admin met under `make run` before its Redis was up: a Redis channel layer
    on a Unix socket that does not exist yet."""
    from accounts.rights import rights_changed
    from vms.events import vm_event_publish

    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [f"unix://{tmp_path}/redis.sock"]},
        }
    }
    caplog.set_level(logging.INFO)
    with django_capture_on_commit_callbacks(execute=True):
        rights_changed([owner.pk])
    vm_event_publish(vm)
    vm_event_publish(vm)
    warnings = _warnings(caplog)
    assert len(warnings) == 1, [w.getMessage() for w in warnings]
    assert warnings[0].exc_info is None
    assert "rights change of user" in warnings[0].getMessage()
