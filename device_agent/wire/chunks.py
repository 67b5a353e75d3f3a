"""Chunking of large training messages (protocol version 2, CHUNK frames; docs/protocol.md §15).

A message whose frame is larger than the link's maximum message size travels as CHUNK frames.
Each carries the transfer id (the message's correlation id), its index, the number of chunks,
its byte offset, the whole message's length and SHA-256, and a slice of the message bytes. The
receiver keys chunks by (sender, transfer id, index), so a redelivered chunk (MQTT QoS 1) is
idempotent; a message is handed over only when every byte is there and the digest matches.
Memory is bounded: transfers per sender, bytes per transfer, and an expiry for stragglers.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from device_agent.wire.events import Counters
from device_agent.wire.frames import MAGIC
from device_agent.wire.tensor_codec import ProtocolError, byte_view

CHUNK_KIND = 6
CHUNK_VERSION = 2
MAX_MESSAGE = 64 << 20  # largest reassembled training message
MAX_CHUNKS = 65_535
_REMEMBER_DONE = 1024  # finished transfers remembered, so a late redelivered chunk is a duplicate
_HEAD = struct.Struct("<2sBB16sIIII32s")  # magic, version, kind, transfer id, index, count, offset, total, sha256


@dataclass(frozen=True)
class Chunk:
    """One decoded CHUNK frame."""

    transfer_id: bytes
    index: int
    count: int
    offset: int
    total: int
    digest: bytes
    data: bytes


def chunk_overhead() -> int:
    """Bytes a CHUNK frame adds to the slice of the message it carries."""
    return _HEAD.size


def split(message: bytes, transfer_id: bytes, max_frame: int) -> list[bytes]:
    """`message` as CHUNK frames of at most `max_frame` bytes each (in order)."""
    if len(transfer_id) != 16:
        raise ProtocolError("transfer id must be 16 bytes")
    if not 0 < len(message) <= MAX_MESSAGE:
        raise ProtocolError(f"a chunked message has 1..{MAX_MESSAGE} bytes")
    size = max_frame - _HEAD.size
    if size < 1:
        raise ProtocolError(f"max frame size {max_frame} leaves no room for chunk data")
    count = -(-len(message) // size)
    if count > MAX_CHUNKS:
        raise ProtocolError(f"{count} chunks needed; at most {MAX_CHUNKS}: raise the maximum message size")
    digest = hashlib.sha256(message).digest()
    return [_HEAD.pack(MAGIC, CHUNK_VERSION, CHUNK_KIND, transfer_id, i, count, off, len(message), digest)
            + message[off:off + size] for i, off in enumerate(range(0, len(message), size))]


def is_chunk(payload: bytes | bytearray | memoryview) -> bool:
    """Whether `payload` starts like a CHUNK frame (magic, version 2, kind 6)."""
    view = byte_view(payload)
    return len(view) >= 4 and bytes(view[:2]) == MAGIC and view[2] == CHUNK_VERSION and view[3] == CHUNK_KIND


def decode_chunk(payload: bytes | bytearray | memoryview) -> Chunk:
    """Parse one CHUNK frame; ProtocolError on anything malformed."""
    view = byte_view(payload)
    if not is_chunk(view):
        raise ProtocolError("not a CHUNK frame")
    if len(view) <= _HEAD.size:
        raise ProtocolError("truncated chunk")
    _, _, _, tid, index, count, offset, total, digest = _HEAD.unpack_from(view)
    data = bytes(view[_HEAD.size:])
    if not 2 <= count <= MAX_CHUNKS or index >= count:
        raise ProtocolError(f"chunk index {index} of {count}")
    if not 0 < total <= MAX_MESSAGE or offset + len(data) > total:
        raise ProtocolError("chunk outside the message")
    return Chunk(tid, index, count, offset, total, digest, data)


@dataclass
class _Transfer:
    count: int
    total: int
    digest: bytes
    started: float
    parts: dict[int, tuple[int, bytes]] = field(default_factory=dict)  # index -> (offset, data)
    received: int = 0


class Reassembler:
    """Collects CHUNK frames per (sender, transfer id) into whole messages; thread-safe.

    Counters: chunks, duplicates, conflicting (a chunk that disagrees with its transfer),
    bad_digest, expired, too_many_transfers, completed.
    """

    def __init__(self, max_transfers_per_sender: int = 4, ttl_s: float = 120.0) -> None:
        self.max_transfers, self.ttl_s = max_transfers_per_sender, ttl_s
        self.counters = Counters()
        self._lock = threading.Lock()
        self._transfers: dict[tuple[str, bytes], _Transfer] = {}
        self._done: OrderedDict[tuple[str, bytes], None] = OrderedDict()

    def add(self, sender: str, chunk: Chunk) -> bytes | None:
        """Take one chunk from `sender`; the whole message when this chunk completed it."""
        self.counters.add("chunks")
        key = (sender, chunk.transfer_id)
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            if key in self._done:
                self.counters.add("duplicates")
                return None
            t = self._transfers.get(key)
            if t is None:
                if sum(s == sender for s, _ in self._transfers) >= self.max_transfers:
                    self.counters.add("too_many_transfers")
                    return None
                t = self._transfers[key] = _Transfer(chunk.count, chunk.total, chunk.digest, now)
            if (chunk.count, chunk.total, chunk.digest) != (t.count, t.total, t.digest):
                self.counters.add("conflicting")
                return None
            if chunk.index in t.parts:
                self.counters.add("duplicates")
                return None
            t.parts[chunk.index] = (chunk.offset, chunk.data)
            t.received += len(chunk.data)
            if len(t.parts) < t.count:
                return None
            del self._transfers[key]
            self._done[key] = None
            if len(self._done) > _REMEMBER_DONE:
                self._done.popitem(last=False)
        message = _join(t)
        if message is None or hashlib.sha256(message).digest() != t.digest:
            self.counters.add("bad_digest")
            return None
        self.counters.add("completed")
        return message

    def pending(self) -> int:
        """Transfers still incomplete."""
        with self._lock:
            return len(self._transfers)

    def _expire(self, now: float) -> None:
        for key in [k for k, t in self._transfers.items() if now - t.started > self.ttl_s]:
            del self._transfers[key]
            self.counters.add("expired")


def _join(t: _Transfer) -> bytes | None:
    """The message from its parts, or None unless they tile 0..total exactly."""
    out, end = bytearray(), 0
    for offset, data in sorted(t.parts.values()):
        if offset != end:
            return None
        out += data
        end += len(data)
    return bytes(out) if end == t.total else None
