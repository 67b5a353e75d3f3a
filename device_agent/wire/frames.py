"""Binary frames of every message family: the header, versions, a bounds-checked reader, field checks.

A frame (docs/protocol.md §5) is a 20-byte header (magic "NM", version, kind, correlation id) and
a kind-specific body. `device_agent.wire.protocol` reads and writes kinds 1-3 (REQUEST, RESPONSE,
ERROR) with this module; another message family (e.g. training messages of version 2) writes its
own module on the same calls, without touching `protocol.decode`:

    MY_KINDS = {10: 2}                                   # kind -> the lowest version that has it
    body = struct.pack("<H", x) + encode_tensor_as(t, "uint8")
    payload = pack_frame(10, cid, body, frame_version(MY_KINDS[10], "uint8"))
    frame = open_frame(payload, MY_KINDS)                # size, magic, version, kind checked
    (x,) = frame.take("<H", "my field")
    t, encoding = frame.tensor()
    frame.end()                                          # no trailing bytes; version minimal

A frame of a kind not in `kinds` is refused ("unknown message kind N"). **Frames are minimal**: a
frame's version is the lowest that can express it (its kind's version and every tensor dtype's),
so every message has exactly one encoding; `FrameReader.end` refuses a higher one, and
`FrameReader.tensor` refuses a dtype that the frame's version does not have.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from device_agent.wire.tensor_codec import (
    ENCODING_VERSIONS,
    MAX_PAYLOAD,
    ProtocolError,
    TensorEncoding,
    byte_view,
    decode_tensor,
)

MAGIC = b"NM"
PROTOCOL_VERSIONS = (1, 2)  # frame versions this implementation reads and writes
CORRELATION_ID_SIZE = 16
HEADER = struct.Struct("<2sBB16s")  # magic, version, kind, correlation id


def frame_version(kind_version: int, *encodings: TensorEncoding) -> int:
    """The version of a frame: the lowest that has its kind and every tensor encoding it carries."""
    return max((kind_version, *(ENCODING_VERSIONS[e] for e in encodings)))


def pack_frame(kind: int, correlation_id: bytes, body: bytes, version: int) -> bytes:
    """Header + body; ProtocolError for a bad correlation id or version, or more than MAX_PAYLOAD bytes."""
    if not isinstance(correlation_id, bytes) or len(correlation_id) != CORRELATION_ID_SIZE:
        raise ProtocolError("correlation_id must be 16 bytes")
    if version not in PROTOCOL_VERSIONS:
        raise ProtocolError(f"unsupported protocol version {version}")
    frame = HEADER.pack(MAGIC, version, kind, correlation_id) + body
    if len(frame) > MAX_PAYLOAD:
        raise ProtocolError("payload too large")
    return frame


def open_frame(payload: bytes | bytearray | memoryview, kinds: Mapping[int, int]) -> FrameReader:
    """Check size, magic, version and kind (one of `kinds`: kind -> its lowest version); a reader at the body."""
    view = byte_view(payload)
    if len(view) > MAX_PAYLOAD:
        raise ProtocolError("payload too large")
    if len(view) < 4:
        raise ProtocolError("truncated header")
    if bytes(view[:2]) != MAGIC:
        raise ProtocolError("bad magic")
    version, kind = view[2], view[3]
    if version not in PROTOCOL_VERSIONS:
        raise ProtocolError(f"unsupported protocol version {version}")
    if kind not in kinds:
        raise ProtocolError(f"unknown message kind {kind}")
    if kinds[kind] > version:
        raise ProtocolError(f"message kind {kind} needs protocol version {kinds[kind]}, the frame has {version}")
    if len(view) < HEADER.size:
        raise ProtocolError("truncated header")
    _, _, _, cid = HEADER.unpack_from(view)
    return FrameReader(view, version, kind, cid, kinds[kind])


class FrameReader:
    """Bounds-checked cursor over one frame's body; every failure is a ProtocolError."""

    def __init__(self, view: memoryview, version: int, kind: int, correlation_id: bytes, kind_version: int) -> None:
        self.view, self.version, self.kind, self.correlation_id = view, version, kind, correlation_id
        self.pos = HEADER.size
        self._needs = kind_version  # the lowest version that expresses what was read so far

    def take(self, fmt: str, what: str) -> tuple[Any, ...]:
        """struct.unpack of `fmt` (little-endian) at the cursor."""
        size = struct.calcsize(fmt)
        if len(self.view) - self.pos < size:
            raise ProtocolError(f"truncated {what}")
        values = struct.unpack_from(fmt, self.view, self.pos)
        self.pos += size
        return values

    def text(self, len_fmt: str, what: str, limit: int) -> str:
        """A UTF-8 string after its byte length (`len_fmt`), at most `limit` bytes."""
        (n,) = self.take(len_fmt, what)
        if n > limit:
            raise ProtocolError(f"{what} longer than {limit} bytes")
        if len(self.view) - self.pos < n:
            raise ProtocolError(f"truncated {what}")
        raw = bytes(self.view[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"{what} is not valid UTF-8") from e

    def tensor(self) -> tuple[np.ndarray, TensorEncoding]:
        """One tensor (float32 values, its wire encoding); its dtype must exist in the frame's version."""
        array, encoding, self.pos = decode_tensor(self.view, self.pos, self.version)
        self._needs = max(self._needs, ENCODING_VERSIONS[encoding])
        return array, encoding

    def end(self) -> None:
        """The frame ends here, and its version is the lowest that expresses it."""
        if self.pos != len(self.view):
            raise ProtocolError("trailing bytes after frame")
        if self.version > self._needs:
            raise ProtocolError(f"unsupported protocol version {self.version} for this frame: version "
                                f"{self._needs} expresses it (a frame has the lowest version that can)")


# ---------------------------------------------------------------------------------------------
# Field checks shared by encoders and decoders


def check_uint(value: object, limit: int, what: str) -> int:
    """An integer (not bool) in 0..limit."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ProtocolError(f"{what} must be an integer")
    if not 0 <= value <= limit:
        raise ProtocolError(f"{what} out of range")
    return int(value)


def check_text(value: object, what: str, max_bytes: int, min_bytes: int = 1) -> str:
    """A string whose UTF-8 encoding has min_bytes..max_bytes bytes."""
    if not isinstance(value, str):
        raise ProtocolError(f"{what} must be a string")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise ProtocolError(f"{what} is not encodable as UTF-8") from e
    if not min_bytes <= size <= max_bytes:
        raise ProtocolError(f"{what} must be {min_bytes}..{max_bytes} bytes")
    return value


def short_text(s: str) -> bytes:
    """u8 byte length + UTF-8 bytes (checked to fit by `check_text` first)."""
    data = s.encode("utf-8")
    return bytes([len(data)]) + data
