"""hostd for tests: a real ``HostDaemon`` on its own event-loop thread, as ``manage.py hostd``
runs it (restartable), scanning a runtime directory the test owns."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from vms.hostd.client import HostdClient
from vms.hostd.daemon import HostDaemon, HostdConfig

FAKE_VMM = Path(__file__).with_name("fake_vmm.py")


class Hostd:
    def __init__(self, root: Path, *, scan_seconds: float = 0.3, **config: Any) -> None:
        config.setdefault("console_ring_bytes", 4096)
        self.config = HostdConfig(
            runtime_dir=root, socket_path=root / "hostd.sock", scan_seconds=scan_seconds, **config
        )
        self.thread: threading.Thread | None = None
        self.daemon: HostDaemon | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> Hostd:
        ready = threading.Event()

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            self.daemon = HostDaemon(self.config)
            self.loop.run_until_complete(self.daemon.start())
            ready.set()
            self.loop.run_until_complete(self.daemon.wait_stopped())
            self.loop.run_until_complete(self.daemon.stop())
            self.loop.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10), "hostd did not start"
        return self

    def stop(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            return
        assert self.loop and self.daemon
        self.loop.call_soon_threadsafe(self.daemon.request_stop)
        self.thread.join(10)

    def client(self) -> HostdClient:
        return HostdClient(self.config.socket_path, timeout=20)

    def _on_loop(self, coro):  # type: ignore[no-untyped-def]
        assert self.loop
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def scan(self) -> None:
        """One runtime-directory scan now, on hostd's loop."""
        assert self.daemon
        self._on_loop(self.daemon.scan())

    def viewer_write_buffers(self) -> list[int]:
        """Bytes hostd has queued (not yet taken by the client) per client connection."""
        assert self.daemon
        daemon = self.daemon

        async def sizes() -> list[int]:
            return [s.writer.transport.get_write_buffer_size() for s in daemon.sessions]

        return self._on_loop(sizes())

    def console_info(self, vm_id: object) -> dict:
        with HostdClient(self.config.socket_path, timeout=10) as client:
            return client.call("console_info", {"vm_id": str(vm_id)})[0]
