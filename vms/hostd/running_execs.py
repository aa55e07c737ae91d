"""The execs hostd knows may be running in one VM, for a cap on how many may run at once.

Every exec started through hostd is added when the agent answers its start; it is removed
once an answer passing through hostd says it ended (``exec_wait``, ``exec_get``,
``exec_read``, ``exec_list``, an exec stream's ``exit``). The set is therefore a superset of
what runs (an exec that ended unnoticed stays in it): fewer than ``limit`` known means fewer
than ``limit`` run, and a capped start needs no guest round trip. Only when the set is unknown
(hostd just attached, the agent session changed, the set outgrew ``MAX_KNOWN``) or full does a
capped start ask the agent (``exec_list``) which still run.

Capped starts of one VM are serialised (``lock``): two cannot both see the last free slot.
The count comes from the agent, as any count of guest processes must; hostd only never
forgets a start it has seen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from vms.hostd.errors import HostdError

MAX_KNOWN = 1024  # more ids than the agent can run (128): forget them all and ask it


class RunningExecs:
    def __init__(self) -> None:
        self.ids: set[str] | None = None  # None: unknown, ask the agent
        self.session = -1  # the agent session the set belongs to
        self.lock = asyncio.Lock()
        self._listing: set[str] | None = None  # starts seen while an exec_list is in flight

    def _current(self, session: int) -> set[str] | None:
        if session != self.session:
            self.session, self.ids = session, None
        return self.ids

    def started(self, session: int, exec_id: object) -> None:
        ids = self._current(session)
        if not isinstance(exec_id, str):
            return
        if self._listing is not None:
            self._listing.add(exec_id)
        if ids is None:
            return
        ids.add(exec_id)
        if len(ids) > MAX_KNOWN:
            self.ids = None

    def seen(self, session: int, summary: object) -> None:
        """An answer about one exec (a summary): forget it once it no longer runs."""
        ids = self._current(session)
        if ids is not None and isinstance(summary, dict) and summary.get("running") is False:
            ids.discard(summary.get("exec_id"))

    def listed(self, session: int, result: object) -> None:
        """An ``exec_list`` answer passing through: forget the execs it shows ended."""
        execs = result.get("execs") if isinstance(result, dict) else None
        for summary in execs if isinstance(execs, list) else ():
            self.seen(session, summary)

    async def count(self, session: int, limit: int, exec_list: Callable[[], Awaitable[dict[str, Any]]]) -> int:
        """How many execs may run (at most ``limit`` is all a caller needs to know); call
        under ``lock``. Asks the agent when the set is unknown or already holds ``limit``."""
        ids = self._current(session)
        if ids is not None and len(ids) < limit:
            return len(ids)
        self._listing = set()
        try:
            result = await exec_list()
            execs = result.get("execs")
            if not isinstance(execs, list):
                raise HostdError("internal", "exec_list answered without a list")
            running = {
                s["exec_id"]
                for s in execs
                if isinstance(s, dict) and s.get("running") and isinstance(s.get("exec_id"), str)
            }
            # Starts answered while the list was in flight may be missing from it: kept.
            fresh = running | self._listing
        finally:
            self._listing = None
        if self.session == session:
            self.ids = fresh if len(fresh) <= MAX_KNOWN else None
        return len(fresh)
