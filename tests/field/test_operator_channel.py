"""The operator's channel (docs/protocol.md §15): telemetry and drain payloads, golden vectors, fuzzing, topics."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent.wire.protocol import ProtocolError, Topics
from device_agent.wire.telemetry import (
    ERROR_NAMES,
    MAX_COUNT,
    MAX_ROUTING,
    MAX_TELEMETRY,
    RECEIVED_ERROR_NAMES,
    Drain,
    LatencyWindow,
    OnDeviceEval,
    Telemetry,
    decode_drain,
    decode_telemetry,
    drain_filter,
    drain_topic,
    encode_drain,
    encode_telemetry,
    telemetry_device,
    telemetry_filter,
    telemetry_topic,
)

VECTORS = Path(__file__).parent.parent / "vectors" / "operator"
VALID = [json.loads(p.read_text()) for p in sorted(VECTORS.glob("*.json")) if p.stem != "invalid"]
INVALID = json.loads((VECTORS / "invalid.json").read_text())
DECODERS = {"telemetry": decode_telemetry, "drain": decode_drain}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def message(vector: dict) -> Telemetry | Drain:
    """The message a vector's `fields` describe (built field by field, not by the decoder)."""
    f = vector["fields"]
    if vector["kind"] == "drain":
        return Drain(f["device"], f["for_s"], f["ts"])
    lat = f["latency_ms"]
    return Telemetry(f["device"], f["seq"], f["ts"], f["period_s"], f["uptime_s"], f["model"], f["status"],
                     f["served"], f["made"], f["inputs"], f["errors"]["sent"], f["errors"]["received"],
                     LatencyWindow(lat["n"], lat.get("p50"), lat.get("p95"), lat.get("p99")), f["queue"],
                     f["cpu_pct"], f["rss_bytes"], f["reconnects"], f["bytes"]["sent"], f["bytes"]["received"],
                     {int(e): n for e, n in f["routing"].items()},
                     OnDeviceEval(**f["eval"]) if "eval" in f else None, f.get("final", False))


def encode(msg: Telemetry | Drain) -> bytes:
    return encode_drain(msg) if isinstance(msg, Drain) else encode_telemetry(msg)


def test_the_vectors_cover_both_payloads_and_every_optional_key() -> None:
    kinds = {v["kind"] for v in VALID}
    assert kinds == {"telemetry", "drain"}
    keys = set().union(*(v["fields"] for v in VALID if v["kind"] == "telemetry"))
    assert {"eval", "final"} <= keys
    assert {v["fields"]["status"] for v in VALID if v["kind"] == "telemetry"} == {"serving", "drained"}
    assert {e["decoder"] for e in INVALID} == {"telemetry", "drain"}


@pytest.mark.parametrize("vector", VALID, ids=lambda v: v["name"])
def test_golden_vector_encodes_and_decodes(vector: dict) -> None:
    payload = bytes.fromhex(vector["hex"])
    assert encode(message(vector)) == payload
    assert DECODERS[vector["kind"]](payload) == message(vector)
    assert json.loads(payload) == vector["fields"]


@pytest.mark.parametrize("entry", INVALID, ids=lambda e: e["name"])
def test_invalid_vector_is_rejected(entry: dict) -> None:
    with pytest.raises(ProtocolError, match=None) as e:
        DECODERS[entry["decoder"]](bytes.fromhex(entry["hex"]))
    assert entry["reason"] in str(e.value)


def test_every_truncation_of_every_vector_is_rejected() -> None:
    for vector in VALID:
        payload = bytes.fromhex(vector["hex"])
        for n in range(len(payload)):
            with pytest.raises(ProtocolError):
                DECODERS[vector["kind"]](payload[:n])


def test_receivers_accept_any_json_layout_and_ignore_unknown_keys() -> None:
    vector = next(v for v in VALID if v["name"] == "telemetry_serving")
    loose = json.dumps({**vector["fields"], "later_key": {"x": [1, 2]}}, indent=3).encode()
    assert decode_telemetry(loose) == message(vector)


def test_the_largest_telemetry_fits_its_bound() -> None:
    """Every value at its longest: 64-char device, 255-byte model, every error code, 64 routing entries."""
    big = Telemetry("d" * 64, MAX_COUNT, 1e12 + 0.125, 86400.5, 1e9 + 0.125, "m" * 255, "drained",
                    {"expert": MAX_COUNT, "infer": MAX_COUNT}, MAX_COUNT, MAX_COUNT,
                    dict.fromkeys(ERROR_NAMES, MAX_COUNT), dict.fromkeys(RECEIVED_ERROR_NAMES, MAX_COUNT),
                    LatencyWindow(MAX_COUNT, 123456.123, 123456.123, 123456.123),
                    {"expert": MAX_COUNT, "infer": MAX_COUNT}, 123456.12, MAX_COUNT, MAX_COUNT, MAX_COUNT, MAX_COUNT,
                    {65535 - i: MAX_COUNT for i in range(MAX_ROUTING)}, OnDeviceEval(MAX_COUNT, MAX_COUNT), True)
    payload = encode_telemetry(big)
    assert len(payload) <= MAX_TELEMETRY
    assert decode_telemetry(payload) == big


@pytest.mark.parametrize("change, reason", [
    ({"status": "busy"}, "status"), ({"made": -1}, "out of range"), ({"cpu_pct": float("nan")}, "finite"),
    ({"errors_sent": {"timeout": 1}}, "unknown key"), ({"routing": {70000: 1}}, "unknown key"),
    ({"latency_ms": LatencyWindow(0, 1.0, 2.0, 3.0)}, "without values"), ({"eval": OnDeviceEval(1, 2)}, "at most"),
    ({"device": "a b"}, "bad device id"), ({"served": {"expert": 1}}, "missing key 'infer'"),
])
def test_the_encoder_refuses_what_the_decoder_would(change: dict, reason: str) -> None:
    valid = message(next(v for v in VALID if v["name"] == "telemetry_serving"))
    with pytest.raises(ProtocolError, match=reason):
        encode_telemetry(replace(valid, **change))


def test_topics() -> None:
    topics = Topics("site-7/nmoe", "lab")
    assert telemetry_topic(topics, "pi-01") == "site-7/nmoe/lab/telemetry/pi-01"
    assert drain_topic(topics, "pi-01") == "site-7/nmoe/lab/drain/pi-01"
    assert telemetry_filter(topics) == "site-7/nmoe/lab/telemetry/+"
    assert drain_filter(topics) == "site-7/nmoe/lab/drain/+"
    assert telemetry_device(topics, "site-7/nmoe/lab/telemetry/pi-01") == "pi-01"
    for other in ("site-7/nmoe/lab/telemetry/pi/01", "site-7/nmoe/lab/telemetry/", "nmoe/lab/telemetry/pi-01",
                  "site-7/nmoe/lab/presence/pi-01", "site-7/nmoe/lab/telemetry/+"):
        assert telemetry_device(topics, other) is None
    with pytest.raises(ProtocolError):
        telemetry_topic(topics, "+")


# fuzzing -------------------------------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**60, 2**60) | st.floats(allow_nan=False)
                           | st.text(max_size=20), lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
TELEMETRY_FIELDS = list(VALID[-1]["fields"]) + ["eval", "final"]


@FUZZ
@given(st.sampled_from(VALID), st.dictionaries(st.sampled_from(TELEMETRY_FIELDS + ["device", "for_s"]), json_values,
                                               max_size=4), st.binary(max_size=60))
def test_fuzz_decoders_raise_only_protocol_errors(vector: dict, changes: dict, raw: bytes) -> None:
    """Valid payloads with keys replaced by random JSON values, and random bytes: accepted or ProtocolError."""
    decoder = DECODERS[vector["kind"]]
    for payload in (json.dumps({**vector["fields"], **changes}).encode(), raw,
                    bytes.fromhex(vector["hex"])[: len(raw)] + raw):
        try:
            decoder(payload)
        except ProtocolError:
            pass


@FUZZ
@given(st.sampled_from(VALID), st.integers(0, 10_000), st.integers(0, 255))
def test_fuzz_single_byte_mutation(vector: dict, position: int, value: int) -> None:
    payload = bytearray.fromhex(vector["hex"])
    payload[position % len(payload)] = value
    try:
        DECODERS[vector["kind"]](bytes(payload))
    except ProtocolError:
        pass


counts = st.integers(0, MAX_COUNT)
positive_counts = st.integers(1, MAX_COUNT)
finite = st.floats(0, 1e12, allow_nan=False, allow_infinity=False)
windows = st.just(LatencyWindow(0)) | st.builds(LatencyWindow, st.integers(1, MAX_COUNT), finite, finite, finite)
telemetries = st.builds(
    Telemetry, st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True), counts, finite,
    st.floats(1e-3, 1e6), finite, st.text(min_size=1, max_size=60), st.sampled_from(["serving", "drained"]),
    st.fixed_dictionaries({"expert": counts, "infer": counts}), counts, counts,
    st.dictionaries(st.sampled_from(ERROR_NAMES), positive_counts),
    st.dictionaries(st.sampled_from(RECEIVED_ERROR_NAMES), positive_counts), windows,
    st.fixed_dictionaries({"expert": counts, "infer": counts}), finite, counts, counts, counts, counts,
    st.dictionaries(st.integers(0, 65535), positive_counts, max_size=MAX_ROUTING),
    st.none() | st.integers(0, 1000).flatmap(lambda n: st.builds(OnDeviceEval, st.just(n), st.integers(0, n))),
    st.booleans())


@FUZZ
@given(telemetries)
def test_fuzz_valid_telemetry_round_trips_within_its_bound(t: Telemetry) -> None:
    payload = encode_telemetry(t)
    assert len(payload) <= MAX_TELEMETRY
    assert decode_telemetry(payload) == t


@FUZZ
@given(st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True), st.floats(0, 86400), finite)
def test_fuzz_valid_drain_round_trips(device: str, for_s: float, ts: float) -> None:
    assert decode_drain(encode_drain(Drain(device, for_s, ts))) == Drain(device, for_s, ts)
