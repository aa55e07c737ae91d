#!/usr/bin/env python3
"""Copy standard input to a log file that never grows past a size cap.

    some-process 2>&1 | scripts/logpipe.py LOG_FILE --max-bytes N --backups K

When the next write would take LOG_FILE past N bytes, it is renamed to LOG_FILE.1 (LOG_FILE.1
to .2 ..., the oldest beyond K removed) and a new LOG_FILE is started, at a line boundary when
the line fits. So every file stays at most N bytes and at most (K + 1) * N bytes are kept.
scripts/run.sh (make run) sends each process's output through it; under systemd, journald
keeps the logs instead (docs/operations.md). Plain Python, no dependencies.
"""

from __future__ import annotations

import argparse
import os
import sys


class RotatingWriter:
    def __init__(self, path: str, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max(1024, max_bytes)
        self.backups = max(0, backups)
        self.fh = open(path, "ab", buffering=0)  # noqa: SIM115 - held for the pipe's life
        self.size = self.fh.tell()

    def rotate(self) -> None:
        self.fh.close()
        if self.backups == 0:
            os.remove(self.path)
        else:
            for n in range(self.backups - 1, 0, -1):
                older = f"{self.path}.{n}"
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{n + 1}")
            os.replace(self.path, f"{self.path}.1")
        self.fh = open(self.path, "ab", buffering=0)  # noqa: SIM115
        self.size = 0

    def write(self, data: bytes) -> None:
        while data:
            room = self.max_bytes - self.size
            if len(data) <= room:
                self.fh.write(data)
                self.size += len(data)
                return
            # Fill up to the last line end that fits (or cut the line when none does).
            cut = data.rfind(b"\n", 0, room) + 1 if room > 0 else 0
            if cut == 0 and self.size == 0:
                cut = room
            if cut:
                self.fh.write(data[:cut])
                self.size += cut
                data = data[cut:]
            self.rotate()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--max-bytes", type=int, default=50 << 20)
    parser.add_argument("--backups", type=int, default=5)
    args = parser.parse_args(argv)
    writer = RotatingWriter(args.path, args.max_bytes, args.backups)
    stdin = sys.stdin.buffer
    while True:
        data = stdin.read1(1 << 16)
        if not data:
            return 0
        writer.write(data)


if __name__ == "__main__":
    sys.exit(main())
