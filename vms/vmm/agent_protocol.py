"""Frame codec of the guest agent protocol v2 (guest_agents/PROTOCOL.md), host side. No Django.

A frame is ``MAGIC | header length (u32 BE) | data length (u32 BE) | CRC-32 | header | data``:
the header is a UTF-8 JSON object, the data raw bytes (file chunks, process output).
The same framing is spoken between hostd and its local clients.

``FrameDecoder`` has two modes:

- ``scanning``: skip bytes until a valid frame (used on a fresh agent connection, before
  the ``hello`` answer, because a virtio-serial stream may start with the tail of a frame
  meant for an earlier host);
- strict (default): the first invalid byte raises ``FrameError``; the caller closes the
  connection. A hostile peer can cost at most ``MAX_FRAME`` bytes of buffer.

Cost is linear in the bytes received whatever the peer sends: the magic is found with
``bytearray.find``, a CRC is computed only over a complete candidate frame, and a scanning
decoder pays for candidates from a CRC credit earned by received bytes
(``CRC_CREDIT_PER_BYTE``, banked up to ``CRC_CREDIT_MAX``). A candidate the credit cannot
pay for is skipped without a CRC: a stream of overlapping fake headers (each claiming a
1 MiB frame, one every 16 bytes) costs at most ``CRC_CREDIT_PER_BYTE`` CRC bytes per byte
received instead of a megabyte of CRC per byte skipped. ``crc_bytes`` counts the work.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

PROTOCOL_VERSION = 2
MAGIC = b"SBX2"
PREFIX = struct.Struct(">4sIII")
MAX_FRAME = 1 << 20  # header + data bytes of one frame
MAX_DATA = 512 << 10  # data bytes per frame senders should use
READ_CHUNK = 256 << 10
CRC_CREDIT_PER_BYTE = 2  # CRC bytes a scanning decoder may spend per byte received
CRC_CREDIT_MAX = 4 * MAX_FRAME  # credit a quiet stream can bank


class FrameError(Exception):
    """The peer broke framing or sent a header that is not a JSON object."""


@dataclass
class Frame:
    header: dict[str, Any]
    data: bytes = b""
    size: int = 0  # bytes on the wire (set by ``FrameDecoder``)


def encode_frame(header: dict[str, Any], data: bytes | memoryview = b"") -> bytes:
    """Serialise one frame; raises ``FrameError`` when header + data exceed ``MAX_FRAME``."""
    return b"".join((encode_frame_head(header, data), data))


def encode_frame_head(header: dict[str, Any], data: bytes | memoryview) -> bytes:
    """A frame without its data: a sender writes ``data`` right after it, without copying it
    into one buffer (the CRC covers ``data`` as usual). Raises ``FrameError`` like ``encode_frame``."""
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    if len(head) + len(data) > MAX_FRAME:
        raise FrameError(f"frame of {len(head) + len(data)} bytes exceeds the {MAX_FRAME} byte limit")
    lengths = struct.pack(">II", len(head), len(data))
    crc = zlib.crc32(data, zlib.crc32(head, zlib.crc32(lengths)))
    return b"".join((MAGIC, lengths, struct.pack(">I", crc), head))


def decode_header(raw: bytes) -> dict[str, Any]:
    """Parse a frame header; raises ``FrameError`` unless it is a UTF-8 JSON object."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FrameError("frame header is not UTF-8 JSON") from exc
    if not isinstance(value, dict):
        raise FrameError("frame header is not a JSON object")
    return value


@dataclass
class FrameDecoder:
    """Incremental decoder. ``feed`` returns complete frames; see the module docstring."""

    scanning: bool = False
    max_skip: int = 16 << 20  # bytes a scanning decoder may discard before giving up
    skipped: int = 0
    received: int = 0  # bytes fed, ever
    crc_bytes: int = 0  # bytes run through CRC-32, ever (the decoder's work)
    crc_credit: int = 2 * MAX_FRAME
    _buf: bytearray = field(default_factory=bytearray)

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        self.received += len(data)
        self.crc_credit = min(CRC_CREDIT_MAX, self.crc_credit + CRC_CREDIT_PER_BYTE * len(data))
        out: list[Frame] = []
        while True:
            frame = self._next()
            if frame is None:
                return out
            out.append(frame)

    def _bad(self, why: str) -> None:
        if not self.scanning:
            raise FrameError(why)
        del self._buf[:1]
        self._count_skip(1)

    def _count_skip(self, n: int) -> None:
        self.skipped += n
        if self.skipped > self.max_skip:
            raise FrameError(f"no valid frame in {self.skipped} bytes")

    def _next(self) -> Frame | None:
        buf = self._buf
        while True:
            if len(buf) < 4:
                if buf and not MAGIC.startswith(bytes(buf)):
                    self._bad("bad frame magic")
                    continue
                return None
            if buf[:4] != MAGIC:
                if not self.scanning:
                    raise FrameError("bad frame magic")
                idx = buf.find(MAGIC, 1)
                if idx < 0:
                    keep = next((k for k in (3, 2, 1) if MAGIC.startswith(bytes(buf[-k:]))), 0)
                    idx = len(buf) - keep
                del buf[:idx]
                self._count_skip(idx)
                continue
            if len(buf) < PREFIX.size:
                return None
            _, hlen, dlen, crc = PREFIX.unpack_from(buf)
            if hlen < 2 or hlen + dlen > MAX_FRAME:
                self._bad(f"bad frame lengths (header {hlen}, data {dlen})")
                continue
            end = PREFIX.size + hlen + dlen
            if len(buf) < end:
                return None
            cost = end - 8  # the lengths and header + data: what the CRC covers
            if self.scanning:
                if cost > self.crc_credit:
                    # Overlapping fake candidates: skip this one unchecked rather than
                    # run the same bytes through CRC again for every byte skipped.
                    self._bad("no CRC credit left for this candidate frame")
                    continue
                self.crc_credit -= cost
            self.crc_bytes += cost
            with memoryview(buf) as view:
                actual = zlib.crc32(view[PREFIX.size : end], zlib.crc32(view[4:12]))
                head = bytes(view[PREFIX.size : PREFIX.size + hlen]) if actual == crc else b""
                data = bytes(view[PREFIX.size + hlen : end]) if actual == crc else b""
            if actual != crc:
                self._bad("frame checksum mismatch")
                continue
            del buf[:end]
            try:
                header = decode_header(head)
            except FrameError:
                if not self.scanning:
                    raise
                continue
            return Frame(header, data, end)


def check_response(header: dict[str, Any]) -> None:
    """Raise ``FrameError`` unless ``header`` is a well-formed response or event."""
    if "ev" in header:
        if not isinstance(header["ev"], str) or not _is_int(header.get("sub")):
            raise FrameError("event without string 'ev' and integer 'sub'")
        return
    req_id = header.get("id")
    if req_id is not None and not _is_int(req_id):
        raise FrameError("response id is not an integer")
    ok = header.get("ok")
    if ok is True:
        if not isinstance(header.get("result", {}), dict):
            raise FrameError("response result is not an object")
    elif ok is False:
        err = header.get("error")
        if not isinstance(err, dict) or not isinstance(err.get("code"), str):
            raise FrameError("error response without an error object")
    else:
        raise FrameError("response has no boolean 'ok'")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
