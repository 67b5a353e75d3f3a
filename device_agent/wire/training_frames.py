"""Federated-training frames of protocol version 2: COMMAND, RESULT (docs/protocol.md §15).

A COMMAND asks one device to do one task (train a round, train its expert, prepare gate data,
evaluate, commit a model version); the device answers one RESULT with the same correlation id
(the task id). Both carry a JSON header and named float32 tensors:

    header (20 B: "NM", 2, kind, task id) | u32 H | H bytes JSON object | u16 T | T x (u8 n, name, TENSOR)

Frames larger than the link's maximum message size travel as CHUNKs (`device_agent.wire.chunks`).
Every decoder raises only ProtocolError.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any

import numpy as np

from device_agent.wire.chunks import MAX_MESSAGE
from device_agent.wire.frames import MAGIC, open_frame, pack_frame
from device_agent.wire.strict_json import strict_loads
from device_agent.wire.tensor_codec import ProtocolError, byte_view, encode_tensor

MAX_HEADER = 16_384
MAX_TENSORS = 1024
MAX_ERROR = 1024
ROUTING = "routing."  # EVALUATE metric routing.<e>: share of the device's top-k choices that went to expert e
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,255}")
_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_MAX_SEED = (1 << 63) - 1


def routing_metrics(shares: Iterable[float]) -> dict[str, float]:
    """The `routing.<e>` metrics of a device's routing shares (§16.3). Zero shares are left out (an absent share
    reads as 0): with hundreds of experts a full row would overflow the RESULT header."""
    return {f"{ROUTING}{e}": float(s) for e, s in enumerate(shares) if s}


class TrainKind(IntEnum):
    """Frame kinds of the training messages (version 2)."""

    COMMAND = 4
    RESULT = 5


KINDS: dict[int, int] = {TrainKind.COMMAND: 2, TrainKind.RESULT: 2}  # kind -> the version that has it


class Op(StrEnum):
    """What a COMMAND asks."""

    SETUP = "setup"  # join run `run` with its resolved config (config.run_config)
    FIT = "fit"  # one federated round: merge the shared tensors, train, send back `upload`
    USE_EXTRACTOR = "use_extractor"  # after Stage 1: keep the shared extractor, compute the latents
    TRAIN_EXPERT = "train_expert"  # Stage 2: train the own expert on local latents; nothing sent back
    PREPARE_GATE = "prepare_gate"  # Stage 3 set-up: every expert's probabilities on local latents
    EVALUATE = "evaluate"  # accuracies of the device's model with the shared tensors
    COMMIT = "commit"  # rebuild the inference files with the shared tensors, serve `model_version`


class Status(StrEnum):
    """How a task ended."""

    OK = "ok"
    ERROR = "error"  # the device could not do it (reason in `error`)
    REFUSED = "refused"  # the command was stale, expired or not for this device's run


@dataclass(frozen=True, eq=False)
class Command:
    """One task for one device."""

    task_id: bytes
    op: Op
    run: str
    job: str
    round: int
    seed: int
    deadline_ms: int
    config: dict[str, Any] = field(default_factory=dict)  # op-specific settings (hyper-parameters...)
    upload: tuple[str, ...] = ()  # FIT: the names to send back
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Result:
    """A device's answer to one Command."""

    task_id: bytes
    op: Op
    run: str
    job: str
    round: int
    status: Status
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


TrainMessage = Command | Result


def encode_training(msg: TrainMessage) -> bytes:
    """The frame of `msg` (possibly larger than one MQTT message: see chunks.split)."""
    if isinstance(msg, Command):
        kind = TrainKind.COMMAND
        head: dict[str, Any] = {"op": msg.op.value, "run": msg.run, "job": msg.job, "round": msg.round,
                                "seed": msg.seed, "deadline_ms": msg.deadline_ms, "config": msg.config,
                                "upload": list(msg.upload)}
    elif isinstance(msg, Result):
        kind = TrainKind.RESULT
        head = {"op": msg.op.value, "run": msg.run, "job": msg.job, "round": msg.round,
                "status": msg.status.value, "num_examples": msg.num_examples, "metrics": msg.metrics,
                "error": msg.error}
    else:
        raise ProtocolError(f"not a training message: {type(msg).__name__}")
    _check_header(kind, head)
    try:
        text = json.dumps(head, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"header is not JSON-serializable: {e}") from e
    if len(text) > MAX_HEADER:
        raise ProtocolError(f"header larger than {MAX_HEADER} bytes")
    parts = [struct.pack("<I", len(text)), text, struct.pack("<H", _check_count(len(msg.tensors)))]
    for name in sorted(msg.tensors):
        raw = _check_name(name).encode("ascii")
        parts += [bytes([len(raw)]), raw, encode_tensor(np.ascontiguousarray(msg.tensors[name], np.float32),
                                                        MAX_MESSAGE)]
    return pack_frame(kind, msg.task_id, b"".join(parts), KINDS[kind], MAX_MESSAGE)


def is_training(payload: bytes | bytearray | memoryview) -> bool:
    """Whether `payload` starts like a COMMAND or RESULT frame."""
    view = byte_view(payload)
    return len(view) >= 4 and bytes(view[:2]) == MAGIC and view[2] >= 2 and view[3] in KINDS


def decode_training(payload: bytes | bytearray | memoryview) -> TrainMessage:
    """Parse one COMMAND or RESULT frame."""
    frame = open_frame(payload, KINDS, MAX_MESSAGE)
    head_text = frame.text("<I", "header", MAX_HEADER)
    try:
        head = strict_loads(head_text, "header")
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as e:
        raise ProtocolError("header is not JSON") from e
    if not isinstance(head, dict):
        raise ProtocolError("header must be a JSON object")
    kind = TrainKind(frame.kind)
    _check_header(kind, head)
    (count,) = frame.take("<H", "tensor count")
    tensors: dict[str, np.ndarray] = {}
    for _ in range(_check_count(count)):
        name = _check_name(frame.text("<B", "tensor name", 255))
        if name in tensors:
            raise ProtocolError(f"duplicate tensor {name!r}")
        array, encoding = frame.tensor()
        if encoding != "fp32":
            raise ProtocolError(f"tensor {name!r} must be float32")
        tensors[name] = array
    frame.end()
    common = (frame.correlation_id, Op(head["op"]), head["run"], head["job"], head["round"])
    if kind == TrainKind.COMMAND:
        return Command(*common, head["seed"], head["deadline_ms"], head["config"], tuple(head["upload"]), tensors)
    return Result(*common, Status(head["status"]), head["num_examples"], head["metrics"], head["error"], tensors)


def _check_header(kind: TrainKind, head: dict[str, Any]) -> None:
    """Every key of the kind's header present with its type and range (unknown keys: ignored)."""
    op = _get(head, "op", str)
    if op not in Op._value2member_map_:
        raise ProtocolError(f"unknown op {op[:40]!r}")
    for key in ("run", "job"):
        if not _ID.fullmatch(_get(head, key, str)):
            raise ProtocolError(f"bad {key} id")
    _uint(head, "round", 0xFFFF_FFFF)
    if kind == TrainKind.COMMAND:
        _uint(head, "seed", _MAX_SEED)
        _uint(head, "deadline_ms", _MAX_SEED)
        _get(head, "config", dict)
        upload = _get(head, "upload", list)
        if len(upload) > MAX_TENSORS or len(set(map(str, upload))) != len(upload):
            raise ProtocolError("upload: at most 1024 distinct names")
        for name in upload:
            _check_name(name)
        return
    status = _get(head, "status", str)
    if status not in Status._value2member_map_:
        raise ProtocolError(f"unknown status {status[:40]!r}")
    _uint(head, "num_examples", 0xFFFF_FFFF)
    metrics = _get(head, "metrics", dict)
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ProtocolError(f"metric {str(name)[:40]!r} must be a finite number")
    if len(_get(head, "error", str).encode("utf-8")) > MAX_ERROR:
        raise ProtocolError(f"error longer than {MAX_ERROR} bytes")


def _get(head: dict[str, Any], key: str, kind: type) -> Any:
    if key not in head:
        raise ProtocolError(f"header missing {key!r}")
    value = head[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ProtocolError(f"header key {key!r} has the wrong type")
    return value


def _uint(head: dict[str, Any], key: str, limit: int) -> int:
    value = _get(head, key, int)
    if not 0 <= value <= limit:
        raise ProtocolError(f"header key {key!r} out of range")
    return int(value)


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ProtocolError(f"bad tensor name {str(name)[:80]!r}")
    return name


def _check_count(n: int) -> int:
    if n > MAX_TENSORS:
        raise ProtocolError(f"more than {MAX_TENSORS} tensors")
    return n

