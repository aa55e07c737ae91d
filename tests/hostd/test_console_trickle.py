"""A QEMU that hands the serial socket one byte per write (its UART does) must not wake hostd
for every byte or two: a guest printing nonstop took three quarters of a core of hostd's one
event loop (the loop every VM's agent and console traffic shares). After a small read hostd
leaves the socket unread for ``TRICKLE_PAUSE_SECONDS``; nothing is lost or reordered (the
VMM's socket buffer holds what comes meanwhile, and the VMM waits when it is full)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from vms.hostd import console

TOTAL = 200_000

# The stand-in QEMU: serves serial.sock and writes TOTAL bytes one per send(), as fast as the
# socket takes them, logging each to serial.log as QEMU's logfile= does (a repeating pattern,
# so loss or reordering shows).
SENDER = r"""
import os, socket, sys
srv = socket.socket(socket.AF_UNIX)
srv.bind(sys.argv[1])
srv.listen(1)
log = os.open(sys.argv[3], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
print("ready", flush=True)
conn, _ = srv.accept()
data = bytes(range(256)) * (int(sys.argv[2]) // 256 + 1)
for i in range(int(sys.argv[2])):
    conn.send(data[i : i + 1])
    os.write(log, data[i : i + 1])
conn.recv(1)  # hold the connection until the reader goes
"""


def test_a_vmm_writing_byte_by_byte_costs_hostd_one_read_per_pause_and_loses_nothing(tmp_path: Path) -> None:
    vm_dir = tmp_path / "vm1"
    vm_dir.mkdir()
    sender = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SENDER,
            str(vm_dir / console.SERIAL_SOCKET),
            str(TOTAL),
            str(vm_dir / console.SERIAL_LOG),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sender.stdout is not None and sender.stdout.readline().strip() == "ready"

        async def run() -> tuple[console.ConsoleLink, float]:
            # QEMU: the output comes from the log; the socket is drained (and prompts a log read).
            link = console.ConsoleLink("vm1", vm_dir, ring_bytes=1 << 20, qemu_log=True)
            link.start()
            try:
                started = time.monotonic()
                deadline = started + 60
                while link.ring.end < TOTAL:
                    assert time.monotonic() < deadline, (link.ring.end, link.socket_reads)
                    await asyncio.sleep(0.01)
                return link, time.monotonic() - started
            finally:
                await link.stop()

        link, elapsed = asyncio.run(run())
    finally:
        sender.kill()
        sender.wait(timeout=10)
    expected = (bytes(range(256)) * (TOTAL // 256 + 1))[:TOTAL]
    assert link.ring.read(0, TOTAL) == expected
    # Each read of less than SMALL_READ is followed by a pause of at least TRICKLE_PAUSE_SECONDS
    # (sleeping longer only means fewer reads). Without the pause, this loop read a few bytes
    # at a time: tens of thousands of reads.
    bound = elapsed / console.TRICKLE_PAUSE_SECONDS + TOTAL / console.SMALL_READ + 10
    assert link.socket_reads <= bound, (link.socket_reads, elapsed)
