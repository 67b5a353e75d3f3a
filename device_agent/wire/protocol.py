"""nmoe-edge wire protocol, version 1: MQTT topics, presence JSON and binary frames.

The normative description is docs/protocol.md; tests/vectors/ holds the golden payloads.
Every decoder here raises only :class:`ProtocolError` on malformed input.
"""

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Literal, NamedTuple, TypeVar

import numpy as np

from device_agent.wire.tensor_codec import (
    ENCODINGS,
    MAX_DIMS,
    MAX_PAYLOAD,
    Encoding,
    ProtocolError,
    byte_view,
    decode_tensor,
    encode_latent,
)

__all__ = [
    "MAX_DEADLINE_AHEAD_MS",
    "MAX_DIMS",
    "MAX_PAYLOAD",
    "MAX_PRESENCE",
    "MAX_TEXT",
    "MAX_TOPIC",
    "PROTOCOL_VERSION",
    "Caps",
    "ErrorCode",
    "ErrorResponse",
    "ExpertRequest",
    "ExpertResponse",
    "Message",
    "MessageKind",
    "ParsedTopic",
    "Presence",
    "ProtocolError",
    "RequestRoute",
    "TopicKind",
    "Topics",
    "deadline_error",
    "decode",
    "decode_presence",
    "encode",
    "encode_presence",
    "new_correlation_id",
    "peek_request_route",
]

PROTOCOL_VERSION = 1
MAGIC = b"NM"
MAX_TOPIC = 256
MAX_TEXT = 1024
MAX_PRESENCE = 4096
MAX_DEADLINE_AHEAD_MS = 60_000
CORRELATION_ID_SIZE = 16

_HEADER = struct.Struct("<2sBB16s")
_MAX_U16 = 0xFFFF
_MAX_U32 = 0xFFFF_FFFF
_MAX_DEADLINE = (1 << 63) - 1
_MAX_SHORT_TEXT = 255
_MAX_RUNTIME = 64
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_EXPERT_ID = re.compile(r"0|[1-9][0-9]{0,4}")
_T = TypeVar("_T")


class MessageKind(IntEnum):
    """Frame kind byte (offset 3)."""

    REQUEST = 1
    RESPONSE = 2
    ERROR = 3


class ErrorCode(IntEnum):
    """ERROR frame codes; docs/protocol.md says when each is sent."""

    BUSY = 1
    BAD_REQUEST = 2
    WRONG_MODEL_VERSION = 3
    DEADLINE_EXCEEDED = 4
    UNKNOWN_EXPERT = 5
    INTERNAL = 6


_KINDS = frozenset(MessageKind)
_ERROR_CODES = frozenset(ErrorCode)

# ---------------------------------------------------------------------------------------------
# Topics


class TopicKind(StrEnum):
    """What an incoming topic is for."""

    PRESENCE = "presence"
    EXPERT_REQUEST = "expert"
    REPLY = "reply"
    INFER_REQUEST = "infer"
    TRAIN_COMMAND = "train-cmd"  # protocol v2 (section 15): coordinator -> device
    TRAIN_RESULT = "train-up"  # device -> coordinator


class ParsedTopic(NamedTuple):
    """A parsed topic: its kind and id (expert id for EXPERT_REQUEST, else a device id).

    For REPLY, `id` is the requester the reply is addressed to and `sender` the server that sent it.
    """

    kind: TopicKind
    id: int | str
    sender: str | None = None


class Topics:
    """Builds and parses the topics of one fleet under `prefix` (one or more id segments)."""

    def __init__(self, prefix: str = "nmoe", fleet: str = "default") -> None:
        if not isinstance(prefix, str) or not all(_ID.fullmatch(s) for s in prefix.split("/")):
            raise ProtocolError(f"bad topic prefix {prefix!r}")
        self.prefix = prefix
        self.fleet = _check_id(fleet, "fleet")
        self.base = f"{prefix}/{fleet}"

    def presence(self, device: str) -> str:
        """Retained presence (and last will) of `device`."""
        return self._topic("presence", _check_id(device, "device"))

    def presence_filter(self) -> str:
        """Subscription filter matching every device's presence."""
        return self._topic("presence", "+")

    def expert_request(self, expert_id: int) -> str:
        """Requests for expert `expert_id`."""
        return self._topic("expert", str(_check_uint(expert_id, _MAX_U16, "expert_id")), "req")

    def reply(self, device: str) -> str:
        """The reply inbox of `device`: what it puts in a request's reply topic (never published to)."""
        return self._topic("reply", _check_id(device, "device"))

    def reply_from(self, requester: str, server: str) -> str:
        """Where `server` publishes its replies to `requester`: `{inbox}/{server}`."""
        return self._topic("reply", _check_id(requester, "device"), _check_id(server, "device"))

    def reply_filter(self, device: str) -> str:
        """Subscription filter for every reply addressed to `device`."""
        return self._topic("reply", _check_id(device, "device"), "+")

    def inbox_owner(self, reply_topic: str) -> str:
        """The requester whose inbox `reply_topic` is; ProtocolError unless it is `reply/{id}` of this fleet."""
        if not isinstance(reply_topic, str) or not reply_topic.startswith(self.base + "/"):
            raise ProtocolError(f"reply topic outside {self.base}/: {str(reply_topic)[:80]!r}")
        match reply_topic[len(self.base) + 1 :].split("/"):
            case ["reply", device]:
                return _check_id(device, "device")
        raise ProtocolError(f"not a reply inbox: {reply_topic[:80]!r}")

    def infer_request(self, device: str) -> str:
        """Local inference requests from apps on `device`."""
        return self._topic("infer", _check_id(device, "device"), "req")

    def train_command(self, device: str) -> str:
        """Training COMMANDs (and their CHUNKs) from the coordinator to `device` (v2, section 15)."""
        return self._topic("train", _check_id(device, "device"), "cmd")

    def train_result(self, device: str) -> str:
        """`device`'s training RESULTs (and their CHUNKs) to the coordinator."""
        return self._topic("train", _check_id(device, "device"), "up")

    def train_result_filter(self) -> str:
        """Subscription filter of the coordinator: every device's training results."""
        return self._topic("train", "+", "up")

    def parse(self, topic: str) -> ParsedTopic:
        """(kind, id) of a topic of this fleet; ProtocolError for anything else."""
        if not isinstance(topic, str) or len(topic.encode("utf-8", "replace")) > MAX_TOPIC:
            raise ProtocolError("topic too long or not a string")
        if not topic.startswith(self.base + "/"):
            raise ProtocolError(f"topic outside {self.base}/: {topic[:80]!r}")
        match topic[len(self.base) + 1 :].split("/"):
            case ["presence", device]:
                return ParsedTopic(TopicKind.PRESENCE, _check_id(device, "device"))
            case ["expert", expert, "req"] if _EXPERT_ID.fullmatch(expert):
                return ParsedTopic(
                    TopicKind.EXPERT_REQUEST, _check_uint(int(expert), _MAX_U16, "expert_id")
                )
            case ["reply", requester, server]:
                return ParsedTopic(
                    TopicKind.REPLY, _check_id(requester, "device"), _check_id(server, "device")
                )
            case ["infer", device, "req"]:
                return ParsedTopic(TopicKind.INFER_REQUEST, _check_id(device, "device"))
            case ["train", device, "cmd"]:
                return ParsedTopic(TopicKind.TRAIN_COMMAND, _check_id(device, "device"))
            case ["train", device, "up"]:
                return ParsedTopic(TopicKind.TRAIN_RESULT, _check_id(device, "device"))
        raise ProtocolError(f"unknown topic {topic[:80]!r}")

    def _topic(self, *parts: str) -> str:
        topic = "/".join((self.base, *parts))
        if len(topic.encode()) > MAX_TOPIC:
            raise ProtocolError(f"topic longer than {MAX_TOPIC} bytes")
        return topic


# ---------------------------------------------------------------------------------------------
# Binary frames


@dataclass(frozen=True, eq=False)
class ExpertRequest:
    """Ask expert `expert_id` for class probabilities of `latent` (batch first)."""

    correlation_id: bytes
    expert_id: int
    deadline_ms: int
    model_version: str
    reply_topic: str
    latent: np.ndarray
    encoding: Encoding = "fp32"


@dataclass(frozen=True, eq=False)
class ExpertResponse:
    """The expert's class probabilities, float32 [N, C]."""

    correlation_id: bytes
    expert_id: int
    compute_us: int
    probs: np.ndarray


@dataclass(frozen=True)
class ErrorResponse:
    """Why a request was not answered with probabilities."""

    correlation_id: bytes
    code: ErrorCode
    expert_id: int
    message: str = ""


Message = ExpertRequest | ExpertResponse | ErrorResponse


class RequestRoute(NamedTuple):
    """Where to send an answer to a request whose tensor may be unreadable."""

    correlation_id: bytes
    expert_id: int
    reply_topic: str


def new_correlation_id() -> bytes:
    """16 random bytes identifying one request."""
    return os.urandom(CORRELATION_ID_SIZE)


def deadline_error(deadline_ms: int, now_ms: int) -> ErrorCode | None:
    """The error a server answers for this deadline at `now_ms`, or None to do the work."""
    if now_ms > deadline_ms:
        return ErrorCode.DEADLINE_EXCEEDED
    if deadline_ms - now_ms > MAX_DEADLINE_AHEAD_MS:
        return ErrorCode.BAD_REQUEST
    return None


def encode(msg: Message) -> bytes:
    """The binary frame of `msg`; ProtocolError if a field is out of range."""
    if isinstance(msg, ExpertRequest):
        kind, body = MessageKind.REQUEST, _request_body(msg)
    elif isinstance(msg, ExpertResponse):
        kind, body = MessageKind.RESPONSE, _response_body(msg)
    elif isinstance(msg, ErrorResponse):
        kind, body = MessageKind.ERROR, _error_body(msg)
    else:
        raise ProtocolError(f"not a protocol message: {type(msg).__name__}")
    cid = msg.correlation_id
    if not isinstance(cid, bytes) or len(cid) != CORRELATION_ID_SIZE:
        raise ProtocolError("correlation_id must be 16 bytes")
    frame = _HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, cid) + body
    if len(frame) > MAX_PAYLOAD:
        raise ProtocolError("payload too large")
    return frame


def decode(payload: bytes | bytearray | memoryview) -> Message:
    """Parse one binary frame; ProtocolError on any malformed input."""
    reader, kind, cid = _open_frame(payload)
    if kind == MessageKind.REQUEST:
        expert_id, deadline_ms, model_version, reply_topic = _read_request_head(reader)
        latent, encoding = reader.tensor()
        msg: Message = ExpertRequest(
            cid, expert_id, deadline_ms, model_version, reply_topic, latent, encoding
        )
    elif kind == MessageKind.RESPONSE:
        expert_id, compute_us = reader.take("<HI", "response header")
        probs, encoding = reader.tensor()
        if encoding != "fp32" or probs.ndim != 2:
            raise ProtocolError("response probs must be fp32 [N, C]")
        msg = ExpertResponse(cid, expert_id, compute_us, probs)
    else:
        code, expert_id = reader.take("<BH", "error header")
        if code not in _ERROR_CODES:
            raise ProtocolError(f"unknown error code {code}")
        message = reader.text("<H", "error message", MAX_TEXT)
        msg = ErrorResponse(cid, ErrorCode(code), expert_id, message)
    reader.end()
    return msg


def peek_request_route(payload: bytes | bytearray | memoryview) -> RequestRoute | None:
    """Correlation id, expert id and reply topic of a v1 REQUEST, even with a bad tensor.

    None when they cannot be read: then a server must not answer (docs/protocol.md).
    """
    try:
        reader, kind, cid = _open_frame(payload)
        if kind != MessageKind.REQUEST:
            return None
        expert_id, _, _, reply_topic = _read_request_head(reader)
    except ProtocolError:
        return None
    return RequestRoute(cid, expert_id, reply_topic)


def _request_body(msg: ExpertRequest) -> bytes:
    if msg.encoding not in ENCODINGS:
        raise ProtocolError(f"unknown latent encoding {msg.encoding!r}")
    return (
        struct.pack(
            "<HQ",
            _check_uint(msg.expert_id, _MAX_U16, "expert_id"),
            _check_uint(msg.deadline_ms, _MAX_DEADLINE, "deadline_ms"),
        )
        + _short_text(_check_text(msg.model_version, "model version", _MAX_SHORT_TEXT))
        + _short_text(_check_reply_topic(msg.reply_topic))
        + encode_latent(msg.latent, msg.encoding)
    )


def _response_body(msg: ExpertResponse) -> bytes:
    if np.ndim(msg.probs) != 2:
        raise ProtocolError("response probs must be [N, C]")
    return struct.pack(
        "<HI",
        _check_uint(msg.expert_id, _MAX_U16, "expert_id"),
        _check_uint(msg.compute_us, _MAX_U32, "compute_us"),
    ) + encode_latent(msg.probs, "fp32")


def _error_body(msg: ErrorResponse) -> bytes:
    if isinstance(msg.code, bool) or msg.code not in _ERROR_CODES:
        raise ProtocolError(f"unknown error code {msg.code!r}")
    text = _check_text(msg.message, "error message", MAX_TEXT, 0).encode("utf-8")
    expert_id = _check_uint(msg.expert_id, _MAX_U16, "expert_id")
    return struct.pack("<BHH", msg.code, expert_id, len(text)) + text


def _short_text(s: str) -> bytes:
    """u8 length + UTF-8 bytes (already checked to fit)."""
    data = s.encode("utf-8")
    return bytes([len(data)]) + data


class _Reader:
    """Bounds-checked cursor over a frame; every failure is a ProtocolError."""

    def __init__(self, view: memoryview, pos: int) -> None:
        self.view, self.pos = view, pos

    def take(self, fmt: str, what: str) -> tuple:
        size = struct.calcsize(fmt)
        if len(self.view) - self.pos < size:
            raise ProtocolError(f"truncated {what}")
        values = struct.unpack_from(fmt, self.view, self.pos)
        self.pos += size
        return values

    def text(self, len_fmt: str, what: str, limit: int) -> str:
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

    def tensor(self) -> tuple[np.ndarray, Encoding]:
        array, encoding, self.pos = decode_tensor(self.view, self.pos)
        return array, encoding

    def end(self) -> None:
        if self.pos != len(self.view):
            raise ProtocolError("trailing bytes after frame")


def _open_frame(payload: bytes | bytearray | memoryview) -> tuple[_Reader, MessageKind, bytes]:
    """Check size, magic, version and kind; return a reader positioned at the body."""
    view = byte_view(payload)
    if len(view) > MAX_PAYLOAD:
        raise ProtocolError("payload too large")
    if len(view) < 4:
        raise ProtocolError("truncated header")
    if bytes(view[:2]) != MAGIC:
        raise ProtocolError("bad magic")
    if view[2] != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {view[2]}")
    if view[3] not in _KINDS:
        raise ProtocolError(f"unknown message kind {view[3]}")
    if len(view) < _HEADER.size:
        raise ProtocolError("truncated header")
    _, _, kind, cid = _HEADER.unpack_from(view)
    return _Reader(view, _HEADER.size), MessageKind(kind), cid


def _read_request_head(reader: _Reader) -> tuple[int, int, str, str]:
    """expert_id, deadline_ms, model_version and reply_topic of a REQUEST body."""
    expert_id, deadline_ms = reader.take("<HQ", "request header")
    if deadline_ms > _MAX_DEADLINE:
        raise ProtocolError("deadline_ms out of range")
    model_version = _check_text(
        reader.text("<B", "model version", _MAX_SHORT_TEXT), "model version", _MAX_SHORT_TEXT
    )
    reply_topic = _check_reply_topic(reader.text("<B", "reply topic", _MAX_SHORT_TEXT))
    return expert_id, deadline_ms, model_version, reply_topic


# ---------------------------------------------------------------------------------------------
# Presence


@dataclass(frozen=True)
class Caps:
    """What a device can do: runtimes, accepted latent encodings, largest batch."""

    runtimes: tuple[str, ...]
    latent_encodings: tuple[Encoding, ...]
    max_batch: int


@dataclass(frozen=True)
class Presence:
    """A device's retained presence; offline presences carry no model, caps or ts."""

    device: str
    expert: int
    status: Literal["online", "offline"]
    model: str | None = None
    caps: Caps | None = None
    ts: float | None = None

    @classmethod
    def offline(cls, device: str, expert: int) -> "Presence":
        """The last-will presence of `device`."""
        return cls(device, expert, "offline")


def encode_presence(p: Presence) -> bytes:
    """Canonical UTF-8 JSON of `p` (sorted keys, no spaces); ProtocolError if invalid."""
    obj: dict[str, object] = {
        "v": PROTOCOL_VERSION,
        "device": p.device,
        "expert": p.expert,
        "status": p.status,
    }
    if p.model is not None:
        obj["model"] = p.model
    if p.ts is not None:
        obj["ts"] = float(p.ts)
    if p.caps is not None:
        obj["caps"] = {
            "runtimes": list(p.caps.runtimes),
            "max_batch": p.caps.max_batch,
            "latent_encodings": list(p.caps.latent_encodings),
        }
    _presence_from_obj(obj)
    data = json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
    if len(data) > MAX_PRESENCE:
        raise ProtocolError(f"presence larger than {MAX_PRESENCE} bytes")
    return data


def decode_presence(payload: bytes | bytearray | memoryview) -> Presence:
    """Parse and validate a presence payload; unknown keys are ignored."""
    view = byte_view(payload)
    if len(view) > MAX_PRESENCE:
        raise ProtocolError(f"presence larger than {MAX_PRESENCE} bytes")
    try:
        obj = json.loads(
            bytes(view).decode("utf-8"),
            object_pairs_hook=_unique_keys,
            parse_constant=_reject_constant,
        )
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as e:
        raise ProtocolError("presence is not UTF-8 JSON") from e
    return _presence_from_obj(obj)


def _presence_from_obj(obj: object) -> Presence:
    """Validate a parsed presence object and build the Presence."""
    if not isinstance(obj, dict):
        raise ProtocolError("presence must be a JSON object")
    v = _key(obj, "v", int)
    if v != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported presence version {v}")
    device = _check_id(_key(obj, "device", str), "device")
    expert = _check_uint(_key(obj, "expert", int), _MAX_U16, "expert")
    status = _key(obj, "status", str)
    if status == "offline":
        if obj.keys() & {"model", "caps", "ts"}:
            raise ProtocolError("offline presence carries only v, device, expert, status")
        return Presence(device, expert, "offline")
    if status != "online":
        raise ProtocolError(f"bad presence status {status[:20]!r}")
    ts = _key(obj, "ts", (int, float))
    if not (math.isfinite(ts) and ts >= 0):
        raise ProtocolError("presence ts must be finite and >= 0")
    model = _check_text(_key(obj, "model", str), "model version", _MAX_SHORT_TEXT)
    return Presence(
        device, expert, "online", model, _caps_from_obj(_key(obj, "caps", dict)), float(ts)
    )


def _caps_from_obj(caps: dict[str, object]) -> Caps:
    """Validate the caps object of an online presence."""
    runtimes = _key(caps, "runtimes", list)
    if not runtimes:
        raise ProtocolError("caps.runtimes must not be empty")
    for runtime in runtimes:
        _check_text(runtime, "runtime name", _MAX_RUNTIME)
    encodings = _key(caps, "latent_encodings", list)
    if (
        not all(isinstance(e, str) and e in ENCODINGS for e in encodings)
        or len(set(encodings)) != len(encodings)
        or "fp32" not in encodings
    ):
        raise ProtocolError("caps.latent_encodings: distinct fp32/fp16/int8, fp32 required")
    max_batch = _check_uint(_key(caps, "max_batch", int), _MAX_U32, "caps.max_batch")
    if max_batch < 1:
        raise ProtocolError("caps.max_batch must be >= 1")
    return Caps(tuple(runtimes), tuple(encodings), max_batch)


def _key(obj: dict[str, object], key: str, kind: type[_T] | tuple[type, ...]) -> _T:
    """obj[key], which must be of `kind` (never a JSON true/false)."""
    if key not in obj:
        raise ProtocolError(f"presence missing key {key!r}")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ProtocolError(f"presence key {key!r} has the wrong type")
    return value  # type: ignore[return-value]


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ProtocolError("duplicate key in presence JSON")
    return obj


def _reject_constant(name: str) -> None:
    raise ProtocolError(f"{name} is not allowed in presence JSON")


# ---------------------------------------------------------------------------------------------
# Field checks shared by encoders and decoders


def _check_id(value: object, what: str) -> str:
    """A fleet or device id: [A-Za-z0-9_-]{1,64}."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ProtocolError(f"bad {what} id {str(value)[:80]!r}")
    return value


def _check_uint(value: object, limit: int, what: str) -> int:
    """An integer (not bool) in 0..limit."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ProtocolError(f"{what} must be an integer")
    if not 0 <= value <= limit:
        raise ProtocolError(f"{what} out of range")
    return int(value)


def _check_text(value: object, what: str, max_bytes: int, min_bytes: int = 1) -> str:
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


def _check_reply_topic(value: object) -> str:
    """An MQTT topic name of 1..255 bytes without wildcards or NUL."""
    topic = _check_text(value, "reply topic", _MAX_SHORT_TEXT)
    if any(c in topic for c in "+#\x00"):
        raise ProtocolError("reply topic contains a wildcard or NUL")
    return topic
