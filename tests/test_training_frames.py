"""Training frames and chunking of protocol version 2 (docs/protocol.md §15): round trips,
validation, reassembly under loss, duplication, reordering and corruption, and fuzzing."""

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent.wire.chunks import Reassembler, chunk_overhead, decode_chunk, is_chunk, split
from device_agent.wire.tensor_codec import ProtocolError
from device_agent.wire.training_frames import (
    Command,
    Op,
    Result,
    Status,
    decode_training,
    encode_training,
    is_training,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TID = bytes(range(16))


def command(**tensors: np.ndarray) -> Command:
    return Command(TID, Op.FIT, "run-1", "stage3_fedce_fedgate", 3, 12345, 1_700_000_000_000,
                   {"epochs": 1, "lr": 0.001}, ("body.0.weight", "body.0.bias"), dict(tensors))


def test_command_and_result_round_trip_bit_exact() -> None:
    rng = np.random.default_rng(0)
    cmd = command(**{"body.0.weight": rng.normal(size=(32, 64)).astype(np.float32),
                     "body.0.bias": rng.normal(size=32).astype(np.float32)})
    back = decode_training(encode_training(cmd))
    assert isinstance(back, Command)
    assert (back.op, back.run, back.job, back.round, back.seed, back.deadline_ms, back.config, back.upload) == (
        cmd.op, cmd.run, cmd.job, cmd.round, cmd.seed, cmd.deadline_ms, cmd.config, cmd.upload)
    for name, value in cmd.tensors.items():
        assert back.tensors[name].tobytes() == value.tobytes()
    res = Result(TID, Op.FIT, "run-1", "job", 3, Status.OK, 600, {"loss": 0.25}, "", dict(cmd.tensors))
    back_res = decode_training(encode_training(res))
    assert isinstance(back_res, Result)
    assert (back_res.status, back_res.num_examples, back_res.metrics) == (Status.OK, 600, {"loss": 0.25})
    assert is_training(encode_training(res)) and not is_chunk(encode_training(res))


@pytest.mark.parametrize("mutate, reason", [
    (lambda h: h.replace(b'"op":"fit"', b'"op":"fly"'), "unknown op"),
    (lambda h: h.replace(b'"round":3', b'"round":-3'), "out of range"),
    (lambda h: h.replace(b'"round":3', b'"round":3.0'), "wrong type"),
    (lambda h: h.replace(b'"run":"run-1"', b'"run":"run/1"'), "bad run id"),
    (lambda h: h.replace(b'"seed":12345', b'"seed":true'), "wrong type"),
    (lambda h: h.replace(b'"config":{', b'"config":{"x":NaN,'), "NaN"),
])
def test_bad_headers_are_rejected(mutate, reason: str) -> None:
    frame = encode_training(command())
    head_len = int.from_bytes(frame[20:24], "little")
    head = frame[24:24 + head_len]
    new = mutate(head)
    bad = frame[:20] + len(new).to_bytes(4, "little") + new + frame[24 + head_len:]
    with pytest.raises(ProtocolError, match=reason):
        decode_training(bad)


def test_non_float32_and_duplicate_tensors_are_rejected() -> None:
    with pytest.raises(ProtocolError):
        encode_training(command(**{"w x": np.zeros(2, np.float32)}))
    frame = encode_training(command(a=np.zeros(2, np.float32)))
    fp16 = frame.replace(bytes([1, 1, 2, 0, 0, 0]) + bytes(8), bytes([2, 1, 2, 0, 0, 0]) + bytes(4))
    with pytest.raises(ProtocolError, match="float32"):
        decode_training(fp16)
    one = encode_training(command(a=np.zeros(2, np.float32)))
    tensor_part = one[-(1 + 1 + 2 + 4 + 8):]
    doubled = one[:-len(tensor_part) - 2] + (2).to_bytes(2, "little") + tensor_part * 2
    with pytest.raises(ProtocolError, match="duplicate"):
        decode_training(doubled)


def test_every_truncation_is_rejected() -> None:
    frame = encode_training(command(a=np.arange(5, dtype=np.float32)))
    for n in range(len(frame)):
        with pytest.raises(ProtocolError):
            decode_training(frame[:n])


def big_message(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def test_split_and_reassemble_in_any_order_with_duplicates() -> None:
    msg = big_message(300_000)
    frames = split(msg, TID, 64 * 1024)
    assert len(frames) == 5 and all(len(f) <= 64 * 1024 for f in frames)
    assert sum(len(f) for f in frames) - len(msg) == 5 * chunk_overhead()
    order = frames + frames[:2]
    random.Random(1).shuffle(order)
    r = Reassembler()
    done = [m for m in (r.add("device-1", decode_chunk(f)) for f in order) if m is not None]
    assert done == [msg]
    assert r.counters.snapshot()["duplicates"] >= 1 and r.pending() == 0


def test_a_lost_chunk_never_completes_and_expires() -> None:
    frames = split(big_message(200_000), TID, 50_000)
    r = Reassembler(ttl_s=0.0)
    assert all(r.add("d", decode_chunk(f)) is None for f in frames[:-1])
    r.add("d", decode_chunk(split(big_message(10, 2), bytes(16), 8 + chunk_overhead())[0]))
    assert r.counters.snapshot()["expired"] >= 1


def test_senders_are_kept_apart_and_conflicts_and_corruption_are_refused() -> None:
    msg = big_message(100_000)
    frames = split(msg, TID, 40_000)
    r = Reassembler()
    assert r.add("a", decode_chunk(frames[0])) is None
    assert r.add("b", decode_chunk(frames[1])) is None  # another sender's transfer with the same id
    other = split(big_message(100_000, 7), TID, 40_000)
    assert r.add("a", decode_chunk(other[1])) is None  # same id, different digest: conflicting
    assert r.counters.snapshot()["conflicting"] == 1
    corrupt = bytearray(frames[2])
    corrupt[-1] ^= 0xFF
    r.add("a", decode_chunk(frames[1]))
    assert r.add("a", decode_chunk(bytes(corrupt))) is None
    assert r.counters.snapshot()["bad_digest"] == 1


def test_transfers_per_sender_are_bounded() -> None:
    r = Reassembler(max_transfers_per_sender=2)
    for i in range(3):
        r.add("d", decode_chunk(split(big_message(1000, i), bytes([i]) * 16, 600)[0]))
    assert r.counters.snapshot()["too_many_transfers"] == 1 and r.pending() == 2


def test_split_refuses_impossible_sizes() -> None:
    with pytest.raises(ProtocolError):
        split(b"x" * 100, TID, chunk_overhead())
    with pytest.raises(ProtocolError):
        split(b"", TID, 1000)


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_decoders_raise_only_protocol_errors(data: bytes) -> None:
    for payload in (data, b"NM\x02\x04" + data, b"NM\x02\x05" + data, b"NM\x02\x06" + data):
        for decoder in (decode_training, decode_chunk):
            try:
                decoder(payload)
            except ProtocolError:
                pass


@FUZZ
@given(st.sampled_from(["cmd", "res"]), st.integers(0, 10_000), st.integers(0, 255))
def test_fuzz_mutated_valid_frames(which: str, pos: int, value: int) -> None:
    msg: Command | Result = command(w=np.ones((3, 4), np.float32)) if which == "cmd" else Result(
        TID, Op.EVALUATE, "r", "j", 0, Status.ERROR, 0, {}, "no data")
    frame = bytearray(encode_training(msg))
    frame[pos % len(frame)] = value
    try:
        decode_training(bytes(frame))
    except ProtocolError:
        pass
