"""Wire protocol (frame versions 1 and 2): frames, tensors, presence, topics, golden vectors and fuzzing."""

import json
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from device_agent.wire.frames import frame_version, open_frame, pack_frame
from device_agent.wire.protocol import (
    MAX_PAYLOAD,
    MAX_TENSOR_DATA,
    MAX_TEXT,
    MAX_TOPIC,
    Caps,
    ErrorCode,
    ErrorResponse,
    ExpertRequest,
    ExpertResponse,
    Message,
    ParsedTopic,
    Presence,
    ProtocolError,
    RawInput,
    RequestRoute,
    TopicKind,
    Topics,
    deadline_error,
    decode,
    decode_presence,
    encode,
    encode_presence,
    new_correlation_id,
    peek_request_route,
    raw_input_encoding,
    raw_input_error,
)
from device_agent.wire.tensor_codec import (
    decode_tensor,
    encode_tensor,
    encode_tensor_as,
    quantize_int8,
)

VECTORS = Path(__file__).parent / "vectors"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CID = bytes.fromhex("00112233445566778899aabbccddeeff")
TOPIC = "nmoe/lab/reply/pi-01"
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "int8": "int8", "uint8": "uint8"}


# ---------------------------------------------------------------------------------------------
# Golden-vector fields <-> messages (these helpers also wrote tests/vectors/*.json)


def tensor_fields(a: np.ndarray, encoding: str) -> dict[str, object]:
    """The `fields` form of a tensor that is encoded with `encoding`."""
    values = np.asarray(a, {"fp16": np.float16, "uint8": np.uint8}.get(encoding, np.float32))
    out: dict[str, object] = {
        "dtype": DTYPE_NAMES[encoding],
        "shape": list(values.shape),
        "values": (values if encoding == "uint8" else values.astype(np.float64)).tolist(),
    }
    if encoding == "int8":
        q, scale, zero_point = quantize_int8(values)
        dequantized = np.float32(scale) * (q.astype(np.float32) - np.float32(zero_point))
        out |= {
            "scale": scale,
            "zero_point": zero_point,
            "q": q.tolist(),
            "dequantized": dequantized.astype(np.float64).tolist(),
        }
    return out


def message_fields(msg: Message) -> dict[str, object]:
    """The `fields` of a golden vector for `msg`."""
    common = {"correlation_id": msg.correlation_id.hex(), "expert_id": msg.expert_id}
    if isinstance(msg, ExpertRequest):
        return common | {
            "deadline_ms": msg.deadline_ms,
            "model_version": msg.model_version,
            "reply_topic": msg.reply_topic,
            "encoding": msg.encoding,
            "latent": tensor_fields(msg.latent, msg.encoding),
        }
    if isinstance(msg, ExpertResponse):
        return common | {"compute_us": msg.compute_us, "probs": tensor_fields(msg.probs, "fp32")}
    return common | {"code": int(msg.code), "code_name": msg.code.name, "message": msg.message}


def message_from_fields(kind: str, f: dict) -> Message:
    """The message whose encoding a golden vector's `hex` is."""
    cid = bytes.fromhex(f["correlation_id"])
    if kind == "request":
        latent = np.array(f["latent"]["values"], np.float32)
        return ExpertRequest(
            cid,
            f["expert_id"],
            f["deadline_ms"],
            f["model_version"],
            f["reply_topic"],
            latent,
            f["encoding"],
        )
    if kind == "response":
        return ExpertResponse(
            cid, f["expert_id"], f["compute_us"], np.array(f["probs"]["values"], np.float32)
        )
    assert ErrorCode(f["code"]).name == f["code_name"]
    return ErrorResponse(cid, ErrorCode(f["code"]), f["expert_id"], f["message"])


def presence_from_fields(f: dict) -> Presence:
    """The Presence a presence vector's JSON object stands for."""
    caps, raw = f.get("caps"), f.get("input")
    return Presence(
        f["device"],
        f["expert"],
        f["status"],
        f.get("model"),
        caps and Caps(tuple(caps["runtimes"]), tuple(caps["latent_encodings"]), caps["max_batch"]),
        f.get("ts"),
        None if "protocols" not in f else tuple(f["protocols"]),
        None if raw is None else RawInput(tuple(raw["shape"]), raw["dtype"]),
    )


def expected_tensor(t: dict) -> np.ndarray:
    """What a decoder returns for a tensor's fields (float32, dequantized)."""
    return np.array(t["dequantized" if t["dtype"] == "int8" else "values"], np.float32)


def assert_decodes_to(msg: Message, kind: str, f: dict) -> None:
    """`msg` (decoded from a vector's hex) carries exactly the vector's fields."""
    assert msg.correlation_id.hex() == f["correlation_id"]
    assert msg.expert_id == f["expert_id"]
    if kind == "request":
        assert isinstance(msg, ExpertRequest)
        assert (msg.deadline_ms, msg.model_version, msg.reply_topic, msg.encoding) == (
            f["deadline_ms"],
            f["model_version"],
            f["reply_topic"],
            f["encoding"],
        )
        assert DTYPE_NAMES[msg.encoding] == f["latent"]["dtype"]
        assert_same_array(msg.latent, expected_tensor(f["latent"]), f["latent"]["shape"])
    elif kind == "response":
        assert isinstance(msg, ExpertResponse)
        assert msg.compute_us == f["compute_us"]
        assert_same_array(msg.probs, expected_tensor(f["probs"]), f["probs"]["shape"])
    else:
        assert isinstance(msg, ErrorResponse)
        assert (msg.code, msg.code.name, msg.message) == (f["code"], f["code_name"], f["message"])


def assert_same_array(got: np.ndarray, want: np.ndarray, shape: list[int]) -> None:
    assert got.dtype == np.float32 and list(got.shape) == shape
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def load_vectors(folder: Path = VECTORS) -> list[dict]:
    return [
        json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if p.stem != "invalid"
    ]


def load_invalid(folder: Path = VECTORS) -> list[dict]:
    return json.loads((folder / "invalid.json").read_text())


VALID = load_vectors()
VALID_V2 = load_vectors(VECTORS / "v2")  # version 2 (tests/vectors/v2/)
FRAMES = [bytes.fromhex(v["hex"]) for v in VALID + VALID_V2 if v["kind"] != "presence"]


# ---------------------------------------------------------------------------------------------
# Golden vectors


def test_vector_set_covers_the_required_cases() -> None:
    names = {v["name"] for v in VALID}
    assert {"request_fp32_1x4", "request_fp16_2x3", "request_int8_1x8", "response_1x10"} <= names
    assert {"presence_online", "presence_offline_will"} <= names
    codes = {v["fields"]["code"] for v in VALID if v["kind"] == "error"}
    assert codes == {int(c) for c in ErrorCode}
    for v in VALID:
        assert set(v) == {"name", "description", "kind", "fields", "hex"}
        assert (VECTORS / f"{v['name']}.json").is_file()
        tensor = v["fields"].get("latent") or v["fields"].get("probs")
        if tensor:  # names end with the shape, e.g. request_fp16_2x3
            assert v["name"].endswith("_" + "x".join(map(str, tensor["shape"])))


@pytest.mark.parametrize("vector", VALID + VALID_V2, ids=lambda v: v["name"])
def test_golden_vector_encodes_and_decodes(vector: dict) -> None:
    kind, fields, payload = vector["kind"], vector["fields"], bytes.fromhex(vector["hex"])
    if kind == "presence":
        assert json.loads(payload) == fields
        assert encode_presence(presence_from_fields(fields)) == payload
        assert decode_presence(payload) == presence_from_fields(fields)
        return
    assert encode(message_from_fields(kind, fields)) == payload
    assert_decodes_to(decode(payload), kind, fields)
    if kind == "request" and fields["encoding"] == "int8":
        q, scale, zero_point = quantize_int8(np.array(fields["latent"]["values"], np.float32))
        assert (q.tolist(), scale, zero_point) == (
            fields["latent"]["q"],
            fields["latent"]["scale"],
            fields["latent"]["zero_point"],
        )


@pytest.mark.parametrize("vector", load_invalid() + load_invalid(VECTORS / "v2"), ids=lambda v: v["name"])
def test_invalid_vector_is_rejected(vector: dict) -> None:
    decoder = decode if vector["decoder"] == "frame" else decode_presence
    with pytest.raises(ProtocolError) as err:
        decoder(bytes.fromhex(vector["hex"]))
    assert vector["reason"] in str(err.value)


def test_invalid_vectors_cover_the_required_cases() -> None:
    names = {v["name"] for v in load_invalid()}
    required = {
        "bad_magic",
        "version_2",
        "truncated_header",
        "truncated_tensor",
        "dims_product_overflow",
        "trailing_byte",
        "int8_scale_zero",
        "unknown_dtype",
        "unknown_kind",
    }
    assert required <= names


def test_version_1_vectors_are_version_1_frames_and_v2_vectors_need_version_2() -> None:
    """Encoders emit the lowest version that expresses a message: every v1 vector stays version 1;
    the v2 vectors use a version-2 feature (a uint8 tensor) or a presence key that v1 ignores."""
    assert all(f[2] == 1 for f in (bytes.fromhex(v["hex"]) for v in VALID if v["kind"] != "presence"))
    v2 = {v["name"]: v for v in VALID_V2}
    assert {"request_infer_uint8_1x1x2x2", "presence_online_v2"} <= set(v2)
    for v in VALID_V2:
        assert (VECTORS / "v2" / f"{v['name']}.json").is_file()
        if v["kind"] != "presence":
            assert bytes.fromhex(v["hex"])[2] == 2 and v["fields"]["latent"]["dtype"] == "uint8"
    presence = decode_presence(bytes.fromhex(v2["presence_online_v2"]["hex"]))
    assert presence.accepts(2) and presence.input == RawInput((1, 28, 28))
    v1_presence = next(v for v in VALID if v["name"] == "presence_online")
    assert not decode_presence(bytes.fromhex(v1_presence["hex"])).accepts(2)  # no protocols key: [1]
    invalid = {v["name"] for v in load_invalid(VECTORS / "v2")}
    assert {"uint8_in_version_1", "version_2_without_version_2_content", "version_3",
            "presence_protocols_without_1", "presence_input_float32"} <= invalid


def test_inference_vectors_against_the_raw_input_rule() -> None:
    """request_infer_fp32_1x1x2x2 is a valid frame that a device answers BAD_REQUEST (0.25 and 0.5 are
    not pixels); the fp16 (v1) and uint8 (v2) inference vectors are raw inputs (protocol.md §6.3)."""
    vectors = {v["name"]: v for v in VALID + VALID_V2 if v["name"].startswith("request_infer_")}
    verdicts = {}
    for name, v in vectors.items():
        msg = decode(bytes.fromhex(v["hex"]))
        assert isinstance(msg, ExpertRequest)
        verdicts[name] = raw_input_error(msg.latent, msg.encoding)
    assert verdicts.pop("request_infer_fp32_1x1x2x2") == "raw input values must be integers 0..255 (uint8 pixels)"
    assert verdicts == {"request_infer_fp16_1x1x2x2": None, "request_infer_uint8_1x1x2x2": None}
    assert "not int8" in str(raw_input_error(np.zeros((1, 1, 2, 2), np.float32), "int8"))
    assert raw_input_encoding(None) == "fp16"


# ---------------------------------------------------------------------------------------------
# Frames


LATENT = np.linspace(-3, 5, 8, dtype=np.float32).reshape(2, 4)


BASE_REQUEST = ExpertRequest(CID, 3, 1_700_000_000_123, "cfg-3f2a9c1e", TOPIC, LATENT, "fp32")


def request(latent: np.ndarray = LATENT, encoding: str = "fp32", **kw: object) -> ExpertRequest:
    """BASE_REQUEST with some fields changed."""
    return replace(BASE_REQUEST, latent=latent, encoding=encoding, **kw)


def test_request_round_trip_every_encoding() -> None:
    for encoding in ("fp32", "fp16", "int8"):
        msg = decode(encode(request(LATENT, encoding)))
        assert isinstance(msg, ExpertRequest) and msg.encoding == encoding
        assert (msg.correlation_id, msg.expert_id, msg.deadline_ms) == (CID, 3, 1_700_000_000_123)
        assert (msg.model_version, msg.reply_topic) == ("cfg-3f2a9c1e", TOPIC)
        assert msg.latent.dtype == np.float32 and msg.latent.shape == (2, 4)
    np.testing.assert_array_equal(decode(encode(request(LATENT))).latent, LATENT)


def test_response_and_error_round_trip() -> None:
    probs = np.full((3, 10), 0.1, np.float32)
    msg = decode(encode(ExpertResponse(CID, 7, 1234, probs)))
    assert isinstance(msg, ExpertResponse) and (msg.expert_id, msg.compute_us) == (7, 1234)
    np.testing.assert_array_equal(msg.probs, probs)
    for code in ErrorCode:
        err = ErrorResponse(CID, code, 65535, f"ünïcode {code.name}")
        assert decode(encode(err)) == err


def test_decode_accepts_bytearray_and_memoryview() -> None:
    frame = encode(request(LATENT))
    for payload in (bytearray(frame), memoryview(frame)):
        np.testing.assert_array_equal(decode(payload).latent, LATENT)


def test_unsupported_version_message() -> None:
    frame = bytearray(encode(request(LATENT)))
    frame[2] = 7
    with pytest.raises(ProtocolError, match="unsupported protocol version 7"):
        decode(bytes(frame))


def test_oversized_payload_rejected() -> None:
    with pytest.raises(ProtocolError, match="payload too large"):
        decode(b"NM\x01\x01" + bytes(MAX_PAYLOAD))
    with pytest.raises(ProtocolError, match="too large"):
        encode(request(np.zeros((1, MAX_PAYLOAD // 4), np.float32)))


def test_largest_tensor_fits() -> None:
    """Every valid tensor can be sent: the largest, 4 dims and int8 (the longest tensor header), in
    a REQUEST with the longest model version and reply topic, is one frame of at most MAX_PAYLOAD."""
    assert MAX_TENSOR_DATA < MAX_PAYLOAD
    latent = np.zeros((1, (MAX_PAYLOAD - 200) // 4), np.float32)  # valid before the limits were made consistent
    with pytest.raises(ProtocolError, match="tensor too large"):
        encode(request(latent))
    longest = request(np.zeros((1, 1, 1, MAX_TENSOR_DATA), np.float32), "int8",
                      model_version="m" * 255, reply_topic="t" * 255)
    assert len(encode(longest)) <= MAX_PAYLOAD
    with pytest.raises(ProtocolError, match="tensor too large"):
        encode(request(np.zeros((1, 1, 1, MAX_TENSOR_DATA + 1), np.float32), "int8"))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"correlation_id": b"short"}, "correlation_id"),
        ({"expert_id": 65536}, "expert_id out of range"),
        ({"expert_id": -1}, "expert_id out of range"),
        ({"expert_id": True}, "expert_id must be an integer"),
        ({"deadline_ms": 1 << 63}, "deadline_ms out of range"),
        ({"model_version": ""}, "model version"),
        ({"model_version": "x" * 256}, "model version"),
        ({"reply_topic": "nmoe/lab/reply/#"}, "wildcard"),
        ({"reply_topic": "t" * 256}, "reply topic"),
        ({"reply_topic": "\ud800"}, "UTF-8"),
        ({"encoding": "bf16"}, "unknown latent encoding"),
        ({"latent": np.array([np.nan], np.float32)}, "non-finite"),
        ({"latent": np.array([1e6]), "encoding": "fp16"}, "non-finite"),
        ({"latent": np.ones((1, 1, 1, 1, 1), np.float32)}, "dims"),
        ({"latent": np.ones((0, 4), np.float32)}, "dims must be >= 1"),
        ({"latent": np.array(["a"])}, "cannot encode"),
        ({"latent": np.array([np.inf]), "encoding": "int8"}, "finite"),
    ],
)
def test_encode_rejects_out_of_range_fields(change: dict, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        encode(request(**change))


def test_encode_rejects_bad_response_and_error() -> None:
    with pytest.raises(ProtocolError, match=r"\[N, C\]"):
        encode(ExpertResponse(CID, 1, 5, np.ones(10, np.float32)))
    with pytest.raises(ProtocolError, match="compute_us"):
        encode(ExpertResponse(CID, 1, 1 << 32, np.ones((1, 10), np.float32)))
    with pytest.raises(ProtocolError, match="error message"):
        encode(ErrorResponse(CID, ErrorCode.BUSY, 1, "x" * (MAX_TEXT + 1)))
    with pytest.raises(ProtocolError, match="unknown error code"):
        encode(ErrorResponse(CID, 9, 1, ""))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="not a protocol message"):
        encode("hello")  # type: ignore[arg-type]
    assert issubclass(ProtocolError, ValueError)


def test_new_correlation_id() -> None:
    ids = {new_correlation_id() for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 16 for i in ids)


def test_deadline_error() -> None:
    now = 1_700_000_000_000
    assert deadline_error(now, now) is None
    assert deadline_error(now + 60_000, now) is None
    assert deadline_error(now - 1, now) is ErrorCode.DEADLINE_EXCEEDED
    assert deadline_error(now + 60_001, now) is ErrorCode.BAD_REQUEST


def test_peek_request_route() -> None:
    frame = encode(request(LATENT))
    assert peek_request_route(frame) == RequestRoute(CID, 3, TOPIC)
    assert peek_request_route(frame[:-1]) == RequestRoute(CID, 3, TOPIC)  # bad tensor
    assert peek_request_route(frame[:40]) is None
    assert peek_request_route(encode(ErrorResponse(CID, ErrorCode.BUSY, 3))) is None
    assert peek_request_route(b"garbage") is None


def test_peek_request_route_reads_version_2_requests() -> None:
    frame = encode(request(np.array([[0, 7, 255]], np.uint8), "uint8"))
    assert frame[2] == 2 and peek_request_route(frame[:-1]) == RequestRoute(CID, 3, TOPIC)


def test_uint8_tensors_carry_integers_0_to_255_only() -> None:
    for values in (np.array([[0.5]]), np.array([[256.0]]), np.array([[-1]]), np.array([[np.nan]])):
        with pytest.raises(ProtocolError, match="integers 0..255"):
            encode(request(values, "uint8"))
    got = decode(encode(request(np.array([[0.0, 17.0, 255.0]], np.float32), "uint8")))
    assert isinstance(got, ExpertRequest) and got.encoding == "uint8" and got.latent.dtype == np.float32
    np.testing.assert_array_equal(got.latent, [[0, 17, 255]])
    with pytest.raises(ProtocolError, match="unknown tensor dtype 4 in a version 1 frame"):
        decode_tensor(encode_tensor_as(np.zeros(3, np.uint8), "uint8"), 0, version=1)


MY_KINDS = {10: 2, 11: 2}  # a second message family of version 2 (as training messages will be)


def test_another_message_family_reuses_the_frame_plumbing() -> None:
    body = struct.pack("<H", 513) + encode_tensor_as(np.array([1.5, -2.0], np.float32), "fp32")
    payload = pack_frame(10, CID, body, frame_version(MY_KINDS[10], "fp32"))
    assert payload[:4] == b"NM\x02\x0a" and payload[4:20] == CID
    frame = open_frame(payload, MY_KINDS)
    assert (frame.version, frame.kind, frame.correlation_id) == (2, 10, CID)
    assert frame.take("<H", "my field") == (513,)
    values, encoding = frame.tensor()
    frame.end()
    assert encoding == "fp32" and values.tolist() == [1.5, -2.0]
    with pytest.raises(ProtocolError, match="unknown message kind 10"):
        decode(payload)  # protocol.decode knows kinds 1-3 only
    with pytest.raises(ProtocolError, match="unknown message kind 1"):
        open_frame(encode(request(LATENT)), MY_KINDS)
    with pytest.raises(ProtocolError, match="message kind 10 needs protocol version 2"):
        open_frame(payload[:2] + b"\x01" + payload[3:], MY_KINDS)
    trailing = open_frame(payload + b"x", MY_KINDS)
    trailing.take("<H", "my field")
    trailing.tensor()
    with pytest.raises(ProtocolError, match="trailing bytes"):
        trailing.end()
    with pytest.raises(ProtocolError, match="unsupported protocol version 3"):
        pack_frame(10, CID, body, 3)
    with pytest.raises(ProtocolError, match="correlation_id"):
        pack_frame(10, b"short", body, 2)
    with pytest.raises(ProtocolError, match="payload too large"):
        pack_frame(10, CID, bytes(MAX_PAYLOAD), 2)


def test_frame_version_is_the_lowest_that_expresses_the_frame() -> None:
    assert frame_version(1) == frame_version(1, "fp32", "fp16", "int8") == 1
    assert frame_version(1, "fp32", "uint8") == frame_version(2, "fp32") == 2
    over = encode(request(LATENT))
    with pytest.raises(ProtocolError, match="unsupported protocol version 2 for this frame: version 1"):
        decode(over[:2] + b"\x02" + over[3:])


# ---------------------------------------------------------------------------------------------
# Tensors


def test_decode_tensor_at_offset_and_bounds() -> None:
    blob = b"xyz" + encode_tensor_as(LATENT, "fp16") + b"tail"
    array, encoding, end = decode_tensor(memoryview(blob), 3)
    assert encoding == "fp16" and blob[end:] == b"tail"
    np.testing.assert_array_equal(array, LATENT.astype(np.float16).astype(np.float32))
    for offset in (-1, len(blob) + 1):
        with pytest.raises(ProtocolError, match="offset"):
            decode_tensor(blob, offset)
    with pytest.raises(ProtocolError, match="cannot encode"):
        encode_tensor(np.ones(3, np.float64))


def test_int8_constant_and_zero_tensors() -> None:
    for value in (0.0, 5.0, -2.5):
        a = np.full((2, 3), value, np.float32)
        q, scale, zero_point = quantize_int8(a)
        assert scale > 0 and -128 <= zero_point <= 127 and q.dtype == np.int8
        decoded, _, _ = decode_tensor(encode_tensor_as(a, "int8"), 0)
        assert np.abs(decoded - a).max() <= scale / 2


def assert_int8_error_bound(a: np.ndarray, decoded: np.ndarray) -> None:
    _, scale, _ = quantize_int8(a)
    a32 = np.asarray(a, np.float32)
    bound = scale / 2 * (1 + 1e-5) + np.spacing(np.abs(a32))
    assert (np.abs(decoded.astype(np.float64) - a32) <= bound).all()


def assert_fp16_precision(a: np.ndarray, decoded: np.ndarray) -> None:
    a32 = np.asarray(a, np.float32).astype(np.float64)
    bound = np.abs(a32) * 2.0**-11 + 2.0**-25  # half an fp16 ulp, relative or subnormal
    assert (np.abs(decoded - a32) <= bound).all()


finite32 = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)
latents = hnp.arrays(
    np.float32, hnp.array_shapes(min_dims=1, max_dims=4, max_side=5), elements=finite32
)


@FUZZ
@given(latents)
def test_int8_error_at_most_half_scale(a: np.ndarray) -> None:
    decoded, encoding, _ = decode_tensor(encode_tensor_as(a, "int8"), 0)
    assert encoding == "int8" and decoded.shape == a.shape
    assert_int8_error_bound(a, decoded)


@FUZZ
@given(latents)
def test_fp16_within_fp16_precision(a: np.ndarray) -> None:
    decoded, _, _ = decode_tensor(encode_tensor_as(a, "fp16"), 0)
    assert_fp16_precision(a, decoded)


# ---------------------------------------------------------------------------------------------
# Presence


ONLINE = Presence(
    "pi-01", 3, "online", "cfg-3f2a9c1e", Caps(("onnxruntime",), ("fp32", "int8"), 32), 1.7e9
)


def test_presence_round_trip_and_will() -> None:
    assert decode_presence(encode_presence(ONLINE)) == ONLINE
    will = Presence.offline("pi-01", 3)
    assert json.loads(encode_presence(will)) == {
        "v": 1,
        "device": "pi-01",
        "expert": 3,
        "status": "offline",
    }
    assert decode_presence(encode_presence(will)) == will


def test_presence_accepts_any_json_layout_and_ignores_unknown_keys() -> None:
    obj = json.loads(encode_presence(ONLINE))
    obj["battery"] = 0.5
    obj["caps"]["accelerator"] = "npu"
    obj["ts"] = 1_700_000_000
    text = json.dumps(dict(reversed(obj.items())), indent=2)
    got = decode_presence(text.encode())
    assert got.ts == 1.7e9 and isinstance(got.ts, float) and got.caps == ONLINE.caps


@pytest.mark.parametrize(
    ("presence", "reason"),
    [
        (Presence("pi/01", 3, "online"), "bad device id"),
        (Presence("pi-01", 70000, "offline"), "expert out of range"),
        (Presence("pi-01", 3, "sleeping"), "bad presence status"),
        (Presence("pi-01", 3, "online"), "missing key"),
        (Presence("pi-01", 3, "offline", model="m"), "offline presence carries only"),
        (Presence("pi-01", 3, "online", "m", ONLINE.caps, float("nan")), "finite"),
        (Presence("pi-01", 3, "online", "m", Caps((), ("fp32",), 1), 1.0), "runtimes"),
        (Presence("pi-01", 3, "online", "m", Caps(("x" * 4096,), ("fp32",), 1), 1.0), "runtime"),
        (
            Presence("pi-01", 3, "online", "m", Caps(("ort",), ("int8",), 1), 1.0),
            "latent_encodings",
        ),
        (Presence("pi-01", 3, "online", "m", Caps(("ort",), ("fp32",), 0), 1.0), "max_batch"),
    ],
)
def test_encode_presence_rejects_invalid(presence: Presence, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        encode_presence(presence)


def test_presence_too_large() -> None:
    runtimes = tuple(f"runtime-{i:04d}" for i in range(400))
    with pytest.raises(ProtocolError, match="larger than 4096"):
        encode_presence(Presence("pi-01", 3, "online", "m", Caps(runtimes, ("fp32",), 1), 1.0))


# ---------------------------------------------------------------------------------------------
# Topics


def test_topics_build_and_parse() -> None:
    t = Topics("nmoe", "lab")
    assert t.presence("pi-01") == "nmoe/lab/presence/pi-01"
    assert t.presence_filter() == "nmoe/lab/presence/+"
    assert t.expert_request(12) == "nmoe/lab/expert/12/req"
    assert t.reply("pi-01") == "nmoe/lab/reply/pi-01"
    assert t.infer_request("pi-01") == "nmoe/lab/infer/pi-01/req"
    assert t.parse("nmoe/lab/presence/pi-01") == ParsedTopic(TopicKind.PRESENCE, "pi-01")
    assert t.parse("nmoe/lab/expert/0/req") == ParsedTopic(TopicKind.EXPERT_REQUEST, 0)
    assert t.parse("nmoe/lab/expert/65535/req") == ParsedTopic(TopicKind.EXPERT_REQUEST, 65535)
    assert t.reply_from("pi-01", "pi-02") == "nmoe/lab/reply/pi-01/pi-02"
    assert t.reply_filter("pi-01") == "nmoe/lab/reply/pi-01/+"
    assert t.parse("nmoe/lab/reply/A_b-9/pi-2") == (TopicKind.REPLY, "A_b-9", "pi-2")
    assert t.inbox_owner("nmoe/lab/reply/A_b-9") == "A_b-9"
    assert t.parse("nmoe/lab/infer/pi-01/req") == ParsedTopic(TopicKind.INFER_REQUEST, "pi-01")
    nested = Topics("site/nmoe", "lab")
    assert nested.parse(nested.reply_from("pi", "pj")) == (TopicKind.REPLY, "pi", "pj")
    assert nested.inbox_owner(nested.reply("pi")) == "pi"


ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)


@FUZZ
@given(ids, ids, st.integers(0, 65535))
def test_topics_round_trip(fleet: str, device: str, expert: int) -> None:
    t = Topics("nmoe", fleet)
    assert t.parse(t.presence(device)) == ParsedTopic(TopicKind.PRESENCE, device)
    assert t.parse(t.reply_from(device, fleet)) == (TopicKind.REPLY, device, fleet)
    assert t.inbox_owner(t.reply(device)) == device
    assert t.parse(t.infer_request(device)) == ParsedTopic(TopicKind.INFER_REQUEST, device)
    assert t.parse(t.expert_request(expert)) == ParsedTopic(TopicKind.EXPERT_REQUEST, expert)


@pytest.mark.parametrize(
    "topic",
    [
        "nmoe/other/presence/pi-01",
        "nmoex/lab/presence/pi-01",
        "nmoe/lab",
        "nmoe/lab/",
        "nmoe/lab/presence/",
        "nmoe/lab/presence/+",
        "nmoe/lab/presence/#",
        "nmoe/lab/presence/pi/01",
        "nmoe/lab/presence/pi 01",
        "nmoe/lab/presence/pï",
        "nmoe/lab/reply/" + "d" * 65,
        "nmoe/lab/expert/007/req",
        "nmoe/lab/expert/65536/req",
        "nmoe/lab/expert/-1/req",
        "nmoe/lab/expert/٣/req",
        "nmoe/lab/expert/3",
        "nmoe/lab/expert/3/res",
        "nmoe/lab/infer/pi-01",
        "nmoe/lab/status/pi-01",
        "nmoe/lab/reply/pi-01/",
        "nmoe/lab/reply/pi-01",
        "nmoe/lab/reply/pi-01/pi-02/x",
        "nmoe/lab/reply/pi-01/+",
        "/nmoe/lab/reply/pi-01",
        "nmoe/lab/reply/" + "d" * MAX_TOPIC,
        "",
    ],
)
def test_topics_parse_rejects(topic: str) -> None:
    with pytest.raises(ProtocolError):
        Topics("nmoe", "lab").parse(topic)


@pytest.mark.parametrize(
    ("prefix", "fleet"),
    [
        ("nmoe", ""),
        ("nmoe", "a/b"),
        ("nmoe", "+"),
        ("nmoe", "#"),
        ("nmoe", "f" * 65),
        ("", "lab"),
        ("a//b", "lab"),
        ("nmoe/", "lab"),
        ("$SYS", "lab"),
        ("nmoe", "lab\n"),
    ],
)
def test_topics_reject_bad_prefix_or_fleet(prefix: str, fleet: str) -> None:
    with pytest.raises(ProtocolError):
        Topics(prefix, fleet)


@pytest.mark.parametrize("topic", ["nmoe/lab/reply/pi-01/pi-02", "nmoe/lab/reply/+", "nmoe/other/reply/pi-01",
                                   "nmoe/lab/presence/pi-01", "nmoe/lab/reply/", 7])
def test_inbox_owner_rejects_anything_but_an_inbox(topic: object) -> None:
    with pytest.raises(ProtocolError):
        Topics("nmoe", "lab").inbox_owner(topic)


def test_topics_reject_bad_ids_when_building() -> None:
    t = Topics("nmoe", "lab")
    for device in ("", "+", "#", "a/b", "x" * 65):
        with pytest.raises(ProtocolError):
            t.reply(device)
    for expert in (-1, 65536, True):
        with pytest.raises(ProtocolError):
            t.expert_request(expert)
    with pytest.raises(ProtocolError, match="longer than"):
        Topics("/".join(["p" * 64] * 3), "f" * 64).infer_request("d" * 64)


# ---------------------------------------------------------------------------------------------
# Fuzzing


def decode_or_reject(payload: bytes) -> Message | None:
    """decode, allowing only ProtocolError; a decoded message must encode again."""
    try:
        msg = decode(payload)
    except ProtocolError:
        return None
    assert isinstance(msg, ExpertRequest | ExpertResponse | ErrorResponse)
    decode(encode(msg))
    return msg


header_prefix = st.sampled_from(
    [b"", b"NM", b"NM\x01", b"NM\x01\x01", b"NM\x01\x02", b"NM\x01\x03"]
)


@FUZZ
@given(header_prefix, st.binary(max_size=200))
def test_fuzz_random_bytes_only_protocol_error(prefix: bytes, tail: bytes) -> None:
    decode_or_reject(prefix + tail)
    with pytest.raises(ProtocolError):
        decode_presence(prefix + tail)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
presence_keys = st.sampled_from(
    [
        "v",
        "device",
        "expert",
        "status",
        "model",
        "caps",
        "ts",
        "runtimes",
        "latent_encodings",
        "max_batch",
    ]
)


@FUZZ
@given(st.dictionaries(presence_keys, json_values, max_size=8), st.binary(max_size=100))
def test_fuzz_presence_only_protocol_error(obj: dict, raw: bytes) -> None:
    base = json.loads(encode_presence(ONLINE))
    for candidate in (base | obj, base | {"caps": base["caps"] | obj}, obj):
        try:
            decode_presence(json.dumps(candidate).encode())
        except ProtocolError:
            pass
    with pytest.raises(ProtocolError):
        decode_presence(raw)


def test_every_truncation_of_every_vector_is_rejected() -> None:
    for vector in VALID + VALID_V2:
        payload = bytes.fromhex(vector["hex"])
        decoder = decode_presence if vector["kind"] == "presence" else decode
        for n in range(len(payload)):
            with pytest.raises(ProtocolError):
                decoder(payload[:n])


def test_every_bit_flip_of_every_frame_decodes_or_is_rejected() -> None:
    for frame in FRAMES:
        for i in range(len(frame)):
            for bit in range(8):
                mutated = bytearray(frame)
                mutated[i] ^= 1 << bit
                decode_or_reject(bytes(mutated))


@FUZZ
@given(st.sampled_from(FRAMES), st.integers(0, 10_000), st.integers(0, 255))
def test_fuzz_single_byte_mutation(frame: bytes, position: int, value: int) -> None:
    mutated = bytearray(frame)
    mutated[position % len(frame)] = value
    decode_or_reject(bytes(mutated))


short_text = st.text(min_size=1, max_size=60)
def request_messages(latent: st.SearchStrategy[np.ndarray], encoding: st.SearchStrategy[str]
                     ) -> st.SearchStrategy[ExpertRequest]:
    return st.builds(
        ExpertRequest,
        correlation_id=st.binary(min_size=16, max_size=16),
        expert_id=st.integers(0, 65535),
        deadline_ms=st.integers(0, (1 << 63) - 1),
        model_version=short_text,
        reply_topic=short_text.filter(lambda s: not set(s) & set("+#\x00")),
        latent=latent,
        encoding=encoding,
    )


requests = request_messages(latents, st.sampled_from(["fp32", "fp16", "int8"]))
pixels = request_messages(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=4, max_side=5)), st.just("uint8"))
responses = st.builds(
    ExpertResponse,
    correlation_id=st.binary(min_size=16, max_size=16),
    expert_id=st.integers(0, 65535),
    compute_us=st.integers(0, 2**32 - 1),
    probs=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, max_side=12),
        elements=st.floats(0, 1, width=32),
    ),
)
errors = st.builds(
    ErrorResponse,
    correlation_id=st.binary(min_size=16, max_size=16),
    code=st.sampled_from(list(ErrorCode)),
    expert_id=st.integers(0, 65535),
    message=st.text(max_size=200),
)


@FUZZ
@given(requests | pixels | responses | errors)
def test_fuzz_valid_messages_round_trip(msg: Message) -> None:
    frame = encode(msg)
    assert frame[2] == (2 if isinstance(msg, ExpertRequest) and msg.encoding == "uint8" else 1)
    got = decode(frame)
    assert type(got) is type(msg) and got.correlation_id == msg.correlation_id
    assert got.expert_id == msg.expert_id
    if isinstance(msg, ErrorResponse):
        assert got == msg
    elif isinstance(msg, ExpertResponse):
        assert got.compute_us == msg.compute_us
        np.testing.assert_array_equal(got.probs, msg.probs)
    else:
        assert (got.deadline_ms, got.model_version, got.reply_topic, got.encoding) == (
            msg.deadline_ms,
            msg.model_version,
            msg.reply_topic,
            msg.encoding,
        )
        assert got.latent.shape == msg.latent.shape
        if msg.encoding in ("fp32", "uint8"):
            np.testing.assert_array_equal(got.latent, msg.latent)
        elif msg.encoding == "fp16":
            assert_fp16_precision(msg.latent, got.latent)
        else:
            assert_int8_error_bound(msg.latent, got.latent)


@settings(FUZZ, max_examples=40)
@given(requests | responses | errors)
def test_fuzz_every_truncation_rejected(msg: Message) -> None:
    frame = encode(msg)
    for n in range(len(frame)):
        with pytest.raises(ProtocolError):
            decode(frame[:n])
