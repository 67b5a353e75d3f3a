"""nmoe-edge wire protocol: MQTT topics, presence JSON and the frames of kinds 1-3 (versions 1 and 2).

The normative description is docs/protocol.md; tests/vectors/ holds the golden payloads. The frame
header, versions and the bounds-checked reader are `device_agent.wire.frames`, shared with other
message families. Every decoder here raises only :class:`ProtocolError` on malformed input.
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

from device_agent.wire.frames import (
    CORRELATION_ID_SIZE,
    PROTOCOL_VERSIONS,
    FrameReader,
    check_text,
    check_uint,
    frame_version,
    open_frame,
    pack_frame,
    short_text,
)
from device_agent.wire.strict_json import load_json
from device_agent.wire.tensor_codec import (
    ENCODINGS,
    MAX_DIMS,
    MAX_PAYLOAD,
    MAX_TENSOR_DATA,
    Encoding,
    ProtocolError,
    TensorEncoding,
    encode_tensor_as,
    is_uint8_valued,
)

__all__ = [
    "MAX_DEADLINE_AHEAD_MS",
    "MAX_DIMS",
    "MAX_PAYLOAD",
    "MAX_PRESENCE",
    "MAX_TENSOR_DATA",
    "MAX_TEXT",
    "MAX_TOPIC",
    "PRESENCE_VERSION",
    "PROTOCOL_VERSIONS",
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
    "RawInput",
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
    "raw_input_encoding",
    "raw_input_error",
]

PRESENCE_VERSION = 1
MAX_TOPIC = 256
MAX_TEXT = 1024
MAX_PRESENCE = 4096
MAX_DEADLINE_AHEAD_MS = 60_000

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


KIND_VERSIONS: dict[int, int] = {kind: 1 for kind in MessageKind}  # kinds 1-3 exist since version 1
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
        return self._topic("expert", str(check_uint(expert_id, _MAX_U16, "expert_id")), "req")

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
                    TopicKind.EXPERT_REQUEST, check_uint(int(expert), _MAX_U16, "expert_id")
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
    """Ask expert `expert_id` for class probabilities of `latent` (batch first); on `infer/{device}/req`
    the tensor is the raw input."""

    correlation_id: bytes
    expert_id: int
    deadline_ms: int
    model_version: str
    reply_topic: str
    latent: np.ndarray
    encoding: TensorEncoding = "fp32"  # uint8 (version 2) for raw inputs only


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


def raw_input_error(tensor: np.ndarray, encoding: TensorEncoding) -> str | None:
    """Why the decoded tensor of an inference request is not a raw input (docs/protocol.md §6.3:
    integers 0..255 as uint8, fp16 or fp32), or None; its shape is the server's to check."""
    if encoding == "int8":
        return ("raw input must be uint8 (protocol 2), fp32 or fp16, not int8 (affine int8 holds "
                "0..255 exactly only by chance)")
    if not is_uint8_valued(tensor):
        return "raw input values must be integers 0..255 (uint8 pixels)"
    return None


def deadline_error(deadline_ms: int, now_ms: int) -> ErrorCode | None:
    """The error a server answers for this deadline at `now_ms`, or None to do the work."""
    if now_ms > deadline_ms:
        return ErrorCode.DEADLINE_EXCEEDED
    if deadline_ms - now_ms > MAX_DEADLINE_AHEAD_MS:
        return ErrorCode.BAD_REQUEST
    return None


def encode(msg: Message) -> bytes:
    """The binary frame of `msg`, in the lowest version that expresses it; ProtocolError if a field
    is out of range."""
    if isinstance(msg, ExpertRequest):
        kind, body, version = MessageKind.REQUEST, _request_body(msg), frame_version(1, msg.encoding)
    elif isinstance(msg, ExpertResponse):
        kind, body, version = MessageKind.RESPONSE, _response_body(msg), 1
    elif isinstance(msg, ErrorResponse):
        kind, body, version = MessageKind.ERROR, _error_body(msg), 1
    else:
        raise ProtocolError(f"not a protocol message: {type(msg).__name__}")
    return pack_frame(kind, msg.correlation_id, body, version)


def decode(payload: bytes | bytearray | memoryview) -> Message:
    """Parse one binary frame of kind 1-3 (version 1 or 2); ProtocolError on any malformed input."""
    reader = open_frame(payload, KIND_VERSIONS)
    cid = reader.correlation_id
    if reader.kind == MessageKind.REQUEST:
        expert_id, deadline_ms, model_version, reply_topic = _read_request_head(reader)
        latent, encoding = reader.tensor()
        msg: Message = ExpertRequest(
            cid, expert_id, deadline_ms, model_version, reply_topic, latent, encoding
        )
    elif reader.kind == MessageKind.RESPONSE:
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
    """Correlation id, expert id and reply topic of a REQUEST (version 1 or 2), even with a bad tensor.

    None when they cannot be read: then a server must not answer (docs/protocol.md).
    """
    try:
        reader = open_frame(payload, KIND_VERSIONS)
        if reader.kind != MessageKind.REQUEST:
            return None
        expert_id, _, _, reply_topic = _read_request_head(reader)
    except ProtocolError:
        return None
    return RequestRoute(reader.correlation_id, expert_id, reply_topic)


def _request_body(msg: ExpertRequest) -> bytes:
    return (
        struct.pack(
            "<HQ",
            check_uint(msg.expert_id, _MAX_U16, "expert_id"),
            check_uint(msg.deadline_ms, _MAX_DEADLINE, "deadline_ms"),
        )
        + short_text(check_text(msg.model_version, "model version", _MAX_SHORT_TEXT))
        + short_text(_check_reply_topic(msg.reply_topic))
        + encode_tensor_as(msg.latent, msg.encoding)
    )


def _response_body(msg: ExpertResponse) -> bytes:
    if np.ndim(msg.probs) != 2:
        raise ProtocolError("response probs must be [N, C]")
    return struct.pack(
        "<HI",
        check_uint(msg.expert_id, _MAX_U16, "expert_id"),
        check_uint(msg.compute_us, _MAX_U32, "compute_us"),
    ) + encode_tensor_as(msg.probs, "fp32")


def _error_body(msg: ErrorResponse) -> bytes:
    if isinstance(msg.code, bool) or msg.code not in _ERROR_CODES:
        raise ProtocolError(f"unknown error code {msg.code!r}")
    text = check_text(msg.message, "error message", MAX_TEXT, 0).encode("utf-8")
    expert_id = check_uint(msg.expert_id, _MAX_U16, "expert_id")
    return struct.pack("<BHH", msg.code, expert_id, len(text)) + text


def _read_request_head(reader: FrameReader) -> tuple[int, int, str, str]:
    """expert_id, deadline_ms, model_version and reply_topic of a REQUEST body."""
    expert_id, deadline_ms = reader.take("<HQ", "request header")
    if deadline_ms > _MAX_DEADLINE:
        raise ProtocolError("deadline_ms out of range")
    model_version = check_text(
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
class RawInput:
    """What a device's `infer/{device}/req` takes: tensors [N, *shape] of integers 0..255 (§6.2)."""

    shape: tuple[int, ...]  # one input without the batch dim, e.g. (1, 28, 28)
    dtype: Literal["uint8"] = "uint8"


@dataclass(frozen=True)
class Presence:
    """A device's retained presence; offline presences carry no model, caps, ts, protocols or input.

    `protocols` and `input` are optional (None: absent); absent `protocols` means [1].
    """

    device: str
    expert: int
    status: Literal["online", "offline"]
    model: str | None = None
    caps: Caps | None = None
    ts: float | None = None
    protocols: tuple[int, ...] | None = None  # the frame versions the device accepts
    input: RawInput | None = None

    def accepts(self, version: int) -> bool:
        """Whether the device accepts frames of `version` (every device accepts version 1)."""
        return version in (self.protocols or (1,))

    @classmethod
    def offline(cls, device: str, expert: int) -> "Presence":
        """The last-will presence of `device`."""
        return cls(device, expert, "offline")


def raw_input_encoding(presence: Presence | None) -> TensorEncoding:
    """How to send a raw input to a device: uint8 when its presence lists version 2, else fp16
    (which holds every integer 0..255 exactly; §6.3)."""
    return "uint8" if presence is not None and presence.accepts(2) else "fp16"


def encode_presence(p: Presence) -> bytes:
    """Canonical UTF-8 JSON of `p` (sorted keys, no spaces); ProtocolError if invalid."""
    obj: dict[str, object] = {
        "v": PRESENCE_VERSION,
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
    if p.protocols is not None:
        obj["protocols"] = list(p.protocols)
    if p.input is not None:
        obj["input"] = {"shape": list(p.input.shape), "dtype": p.input.dtype}
    _presence_from_obj(obj)
    data = json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
    if len(data) > MAX_PRESENCE:
        raise ProtocolError(f"presence larger than {MAX_PRESENCE} bytes")
    return data


def decode_presence(payload: bytes | bytearray | memoryview) -> Presence:
    """Parse and validate a presence payload; unknown keys are ignored."""
    return _presence_from_obj(load_json(payload, MAX_PRESENCE, "presence"))


def _presence_from_obj(obj: object) -> Presence:
    """Validate a parsed presence object and build the Presence."""
    if not isinstance(obj, dict):
        raise ProtocolError("presence must be a JSON object")
    v = _key(obj, "v", int)
    if v != PRESENCE_VERSION:
        raise ProtocolError(f"unsupported presence version {v}")
    device = _check_id(_key(obj, "device", str), "device")
    expert = check_uint(_key(obj, "expert", int), _MAX_U16, "expert")
    status = _key(obj, "status", str)
    if status == "offline":
        if obj.keys() & {"model", "caps", "ts", "protocols", "input"}:
            raise ProtocolError("offline presence carries only v, device, expert, status")
        return Presence(device, expert, "offline")
    if status != "online":
        raise ProtocolError(f"bad presence status {status[:20]!r}")
    ts: float = _key(obj, "ts", (int, float))
    if not (math.isfinite(ts) and ts >= 0):
        raise ProtocolError("presence ts must be finite and >= 0")
    model = check_text(_key(obj, "model", str), "model version", _MAX_SHORT_TEXT)
    return Presence(
        device, expert, "online", model, _caps_from_obj(_key(obj, "caps", dict)), float(ts),
        None if "protocols" not in obj else _protocols_from_obj(_key(obj, "protocols", list)),
        None if "input" not in obj else _input_from_obj(_key(obj, "input", dict)),
    )


def _protocols_from_obj(protocols: list[object]) -> tuple[int, ...]:
    """The optional `protocols` key: distinct frame versions 1..255, version 1 among them."""
    versions = tuple(check_uint(v, 255, "protocols version") for v in protocols)
    if 1 not in versions or 0 in versions or len(set(versions)) != len(versions):
        raise ProtocolError("protocols: distinct versions 1..255, 1 required")
    return versions


def _input_from_obj(raw: dict[str, object]) -> RawInput:
    """The optional `input` key: the shape of one raw input (1..3 dims) and dtype "uint8"."""
    shape = _key(raw, "shape", list)
    if not 1 <= len(shape) < MAX_DIMS:
        raise ProtocolError(f"input.shape must have 1..{MAX_DIMS - 1} dims")
    dims = tuple(check_uint(d, _MAX_U32, "input.shape dim") for d in shape)
    if 0 in dims:
        raise ProtocolError("input.shape dims must be >= 1")
    if _key(raw, "dtype", str) != "uint8":
        raise ProtocolError("input.dtype must be \"uint8\"")
    return RawInput(dims)


def _caps_from_obj(caps: dict[str, object]) -> Caps:
    """Validate the caps object of an online presence."""
    runtimes = _key(caps, "runtimes", list)
    if not runtimes:
        raise ProtocolError("caps.runtimes must not be empty")
    for runtime in runtimes:
        check_text(runtime, "runtime name", _MAX_RUNTIME)
    encodings = _key(caps, "latent_encodings", list)
    if (
        not all(isinstance(e, str) and e in ENCODINGS for e in encodings)
        or len(set(encodings)) != len(encodings)
        or "fp32" not in encodings
    ):
        raise ProtocolError("caps.latent_encodings: distinct fp32/fp16/int8, fp32 required")
    max_batch = check_uint(_key(caps, "max_batch", int), _MAX_U32, "caps.max_batch")
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



# ---------------------------------------------------------------------------------------------
# Field checks shared by encoders and decoders


def _check_id(value: object, what: str) -> str:
    """A fleet or device id: [A-Za-z0-9_-]{1,64}."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ProtocolError(f"bad {what} id {str(value)[:80]!r}")
    return value


def _check_reply_topic(value: object) -> str:
    """An MQTT topic name of 1..255 bytes without wildcards or NUL."""
    topic = check_text(value, "reply topic", _MAX_SHORT_TEXT)
    if any(c in topic for c in "+#\x00"):
        raise ProtocolError("reply topic contains a wildcard or NUL")
    return topic
