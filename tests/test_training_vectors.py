"""Golden vectors of the training frames (docs/protocol.md §16): COMMAND, RESULT, CHUNK.

`python tests/test_training_vectors.py --write` wrote tests/vectors/training/ from the messages below;
the tests check that encoding gives the bytes, decoding gives the fields, and invalid payloads fail.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.wire.chunks import decode_chunk, split
from device_agent.wire.tensor_codec import ProtocolError
from device_agent.wire.training_frames import (
    Command,
    Op,
    Result,
    Status,
    decode_training,
    encode_training,
)

FOLDER = Path(__file__).parent / "vectors" / "training"
TASK = bytes(range(16))
DEADLINE = 1700000000123


def _messages() -> dict[str, tuple[str, Command | Result]]:
    return {
        "command_setup": ("SETUP: join run r1 with its resolved config (shortened here); no tensors", Command(
            TASK, Op.SETUP, "r1", "setup", 0, 0, DEADLINE, {"run_config": {"seed": 0, "torch_threads": 2}})),
        "command_fit": ("FIT round 2 of a FedGate job: the shared gate body in, the names to send back", Command(
            TASK, Op.FIT, "r1", "stage3_fedce_fedgate", 2, 7, DEADLINE, {}, ("body.0.bias",),
            {"body.0.bias": np.array([0.5, -1.25], np.float32), "body.0.weight": np.array([[1.0, 2.0]], np.float32)})),
        "result_fit_ok": ("the device's answer: exactly the uploaded name, its example count and metrics", Result(
            TASK, Op.FIT, "r1", "stage3_fedce_fedgate", 2, Status.OK, 40, {"loss": 0.5},
            tensors={"body.0.bias": np.array([0.25, 2.0], np.float32)})),
        "result_refused": ("a stale round is refused with its reason", Result(
            TASK, Op.FIT, "r1", "stage1_fedce", 1, Status.REFUSED,
            error="stale round 1 of stage1_fedce (this device trained round 2)")),
    }


def _fields(msg: Command | Result) -> dict[str, Any]:
    common = {"task_id": msg.task_id.hex(), "op": msg.op.value, "run": msg.run, "job": msg.job, "round": msg.round}
    tensors = {k: {"shape": list(v.shape), "values": v.tolist()} for k, v in sorted(msg.tensors.items())}
    if isinstance(msg, Command):
        return {**common, "seed": msg.seed, "deadline_ms": msg.deadline_ms, "config": msg.config,
                "upload": list(msg.upload), "tensors": tensors}
    return {**common, "status": msg.status.value, "num_examples": msg.num_examples, "metrics": msg.metrics,
            "error": msg.error, "tensors": tensors}


def _chunks() -> list[dict[str, Any]]:
    frame = encode_training(_messages()["command_fit"][1])
    return [{"name": f"chunk_{i}_of_command_fit", "kind": "chunk",
             "description": f"chunk {i} of command_fit split under a maximum message of 100 bytes",
             "fields": {"transfer_id": TASK.hex(), "index": c.index, "count": c.count, "offset": c.offset,
                        "total": c.total, "sha256": c.digest.hex(), "data": c.data.hex()},
             "hex": raw.hex()}
            for i, raw in enumerate(split(frame, TASK, 100)) for c in [decode_chunk(raw)]]


def _invalid() -> list[dict[str, str]]:
    fit = encode_training(_messages()["command_fit"][1])
    head_len = int.from_bytes(fit[20:24], "little")
    bad_dtype = bytearray(fit)
    bad_dtype[24 + head_len + 2 + 1 + len("body.0.bias")] = 2  # the first tensor's dtype: float16
    duplicate = fit.replace(b"body.0.weight", b"body.0.bias\x00\x00").replace(b"\x0dbody.0.bias", b"\x0bbody.0.bias")
    chunk = bytes.fromhex(_chunks()[0]["hex"])
    return [
        {"name": "version_1_command", "decoder": "training", "hex": (fit[:2] + b"\x01" + fit[3:]).hex(),
         "reason": "training frames need protocol version 2"},
        {"name": "float16_tensor", "decoder": "training", "hex": bytes(bad_dtype).hex(),
         "reason": "tensors of a training frame are float32"},
        {"name": "trailing_byte", "decoder": "training", "hex": (fit + b"\x00").hex(), "reason": "trailing bytes"},
        {"name": "header_not_json", "decoder": "training",
         "hex": (fit[:24] + b"{" + fit[25:]).replace(b'{"config"', b'["config"', 1).hex(),
         "reason": "the header is a JSON object"},
        {"name": "duplicate_tensor_name", "decoder": "training", "hex": duplicate.hex(),
         "reason": "tensor names are distinct"} if duplicate != fit else {},
        {"name": "chunk_count_1", "decoder": "chunk", "hex": (chunk[:24] + (1).to_bytes(4, "little") + chunk[28:]).hex(),
         "reason": "a chunked message has at least 2 chunks"},
        {"name": "chunk_index_past_count", "decoder": "chunk",
         "hex": (chunk[:20] + (9).to_bytes(4, "little") + chunk[24:]).hex(), "reason": "index < count"},
        {"name": "chunk_without_data", "decoder": "chunk", "hex": chunk[:68].hex(), "reason": "at least 1 byte of data"},
    ]


def write_vectors() -> None:
    FOLDER.mkdir(parents=True, exist_ok=True)
    for name, (description, msg) in _messages().items():
        kind = "command" if isinstance(msg, Command) else "result"
        vector = {"name": name, "description": description, "kind": kind, "fields": _fields(msg),
                  "hex": encode_training(msg).hex()}
        (FOLDER / f"{name}.json").write_text(json.dumps(vector, indent=2) + "\n")
    for vector in _chunks():
        (FOLDER / f"{vector['name']}.json").write_text(json.dumps(vector, indent=2) + "\n")
    (FOLDER / "invalid.json").write_text(json.dumps([v for v in _invalid() if v], indent=2) + "\n")


VALID = sorted(p for p in FOLDER.glob("*.json") if p.name != "invalid.json")
INVALID = json.loads((FOLDER / "invalid.json").read_text()) if (FOLDER / "invalid.json").exists() else []


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_vector_decodes_to_its_fields_and_encodes_to_its_bytes(path: Path) -> None:
    vector = json.loads(path.read_text())
    raw = bytes.fromhex(vector["hex"])
    if vector["kind"] == "chunk":
        c = decode_chunk(raw)
        f = vector["fields"]
        assert (c.transfer_id.hex(), c.index, c.count, c.offset, c.total, c.digest.hex(), c.data.hex()) == (
            f["transfer_id"], f["index"], f["count"], f["offset"], f["total"], f["sha256"], f["data"])
        return
    msg = decode_training(raw)
    assert _fields(msg) == vector["fields"]
    assert all(v.dtype == np.float32 for v in msg.tensors.values())
    assert encode_training(msg) == raw
    for cut in range(len(raw)):
        with pytest.raises(ProtocolError):
            decode_training(raw[:cut])


def test_chunks_of_the_vector_reassemble_to_the_command() -> None:
    chunks = [bytes.fromhex(json.loads(p.read_text())["hex"]) for p in VALID if p.stem.startswith("chunk_")]
    assert len(chunks) >= 3
    decoded = sorted((decode_chunk(c) for c in chunks), key=lambda c: c.index)
    message = b"".join(c.data for c in decoded)
    assert message.hex() == json.loads((FOLDER / "command_fit.json").read_text())["hex"]


@pytest.mark.parametrize("vector", INVALID, ids=lambda v: v["name"])
def test_invalid_vector_is_rejected(vector: dict[str, str]) -> None:
    decode = decode_training if vector["decoder"] == "training" else decode_chunk
    with pytest.raises(ProtocolError):
        decode(bytes.fromhex(vector["hex"]))


def test_the_vectors_are_what_the_messages_encode_to() -> None:
    """The files were written by write_vectors() and not edited by hand."""
    for name, (_, msg) in _messages().items():
        assert json.loads((FOLDER / f"{name}.json").read_text())["hex"] == encode_training(msg).hex()
    assert [v for v in _invalid() if v] == INVALID


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    write_vectors()
