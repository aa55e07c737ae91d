"""Keeps an open websocket's rights checked (accounts.rights): joins the user's rights group,
re-checks on every ``rights.changed`` event and every SANDBOX_WS_RECHECK_SECONDS, and closes
the connection (4403) once a check fails."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from channels.db import database_sync_to_async
from django.conf import settings

from accounts.rights import rights_group

logger = logging.getLogger(__name__)

CLOSE_RIGHTS_GONE = 4403


class RightsWatch:
    """``check`` (sync, runs in the database thread) returns False when the connection must
    end; ``on_lost`` (async) then closes it."""

    def __init__(self, consumer, *, user_id, check: Callable[[], bool], on_lost: Callable[[], Awaitable[None]]):
        self.consumer = consumer
        self.user_id = user_id
        self.check = check
        self.on_lost = on_lost
        self.task: asyncio.Task | None = None
        self.joined = False
        self.lost = False

    async def start(self) -> None:
        await self.consumer.channel_layer.group_add(rights_group(self.user_id), self.consumer.channel_name)
        self.joined = True
        self.task = asyncio.create_task(self._periodic())

    async def _periodic(self) -> None:
        while not self.lost:
            await asyncio.sleep(settings.SANDBOX_WS_RECHECK_SECONDS)
            await self.recheck()

    async def recheck(self) -> None:
        if self.lost:
            return
        try:
            holds = await database_sync_to_async(self.check)()
        except Exception:  # the database is unreachable: try again next time
            logger.warning("rights re-check of a websocket of user %s failed", self.user_id, exc_info=True)
            return
        if not holds and not self.lost:
            self.lost = True
            await self.on_lost()

    async def stop(self) -> None:
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        if self.joined:
            self.joined = False
            with contextlib.suppress(Exception):
                await self.consumer.channel_layer.group_discard(rights_group(self.user_id), self.consumer.channel_name)
