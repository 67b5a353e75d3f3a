"""A web device (device-2 of the tiny fleet in headless Chromium) on a real mosquitto, through the
WebSocket bridge: its expert answers Python requesters like ONNX Runtime, every error code of
docs/protocol.md §9, BUSY from its bounded queue, 200 malformed frames survived, tampered bundles refused."""

import json
import random
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from fleet_helpers import TOPICS, Client, request_frame
from web_helpers import launch

from broker.process import BrokerOptions, RunningBroker, start_broker
from device_agent.bundle import BundleError, load_bundle
from device_agent.device_models import model_version
from device_agent.nmoe_local import softmax
from device_agent.runtime import open_runtime
from device_agent.wire.clock import now_ms
from device_agent.wire.mqtt_transport import BrokerUrl, MqttSettings, MqttTransport
from device_agent.wire.protocol import (
    ErrorCode,
    ErrorResponse,
    ExpertRequest,
    ExpertResponse,
    decode,
    encode,
    new_correlation_id,
)
from device_agent.wire.tensor_codec import decode_tensor, encode_tensor_as
from toolkit.fleet.web_devices import WebDevices

EXPERT = 2  # device-2 holds expert 2


def _client(broker: RunningBroker, name: str) -> Client:
    return Client(MqttTransport(MqttSettings(BrokerUrl.parse(broker.url), f"test-{name}")))


def _ask(client: Client, frame: bytes, topic: str = TOPICS.expert_request(EXPERT), timeout_s: float = 30.0):
    cid = decode(frame).correlation_id  # type: ignore[union-attr]
    client.publish(topic, frame)
    return client.wait_for_reply(cid, timeout_s)


@pytest.fixture(scope="module")
def requester(web_broker: RunningBroker, web_device: WebDevices):
    client = _client(web_broker, "requester")
    yield client
    client.close()


@pytest.fixture(scope="module")
def expert_fp32(onnx_tflite_bundles: Path):
    bundle = load_bundle(onnx_tflite_bundles / "device-2")
    runtime = open_runtime(bundle, bundle.model("expert", "fp32", "onnx"))
    return bundle, lambda z: softmax(runtime.run(z))


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8"])
def test_python_request_to_the_web_expert_matches_onnx_runtime(encoding: str, requester: Client, expert_fp32) -> None:
    bundle, expert = expert_fp32
    latent = np.random.default_rng(7).normal(size=(5, bundle.manifest.latent_dim)).astype(np.float32)
    reply = _ask(requester, request_frame(EXPERT, latent, model_version(bundle), encoding=encoding))
    assert isinstance(reply, ExpertResponse), reply
    assert reply.expert_id == EXPERT and reply.probs.shape == (5, bundle.manifest.num_classes)
    # what the web device received: the latent as the wire carries it in this encoding
    sent, _, _ = decode_tensor(encode_tensor_as(latent, encoding), 0)
    np.testing.assert_allclose(reply.probs, expert(sent), atol=1e-5, rtol=0)
    assert not np.allclose(reply.probs, reply.probs[0])  # five different answers, not one repeated


def _error(reply: object) -> ErrorCode:
    assert isinstance(reply, ErrorResponse), reply
    return reply.code


def test_every_refusal_answers_its_error_code(requester: Client, expert_fp32) -> None:
    bundle, _ = expert_fp32
    model, dim = model_version(bundle), bundle.manifest.latent_dim
    z = np.zeros((1, dim), np.float32)
    assert _error(_ask(requester, request_frame(EXPERT, z, "another-model"))) == ErrorCode.WRONG_MODEL_VERSION
    assert _error(_ask(requester, request_frame(EXPERT, z, model, deadline_ms=now_ms() - 5000))) == ErrorCode.DEADLINE_EXCEEDED
    assert _error(_ask(requester, request_frame(EXPERT, z, model, deadline_ms=now_ms() + 120_000))) == ErrorCode.BAD_REQUEST
    assert _error(_ask(requester, request_frame(EXPERT, np.zeros((1, dim + 1), np.float32), model))) == ErrorCode.BAD_REQUEST
    assert _error(_ask(requester, request_frame(EXPERT, np.zeros((33, dim), np.float32), model))) == ErrorCode.BAD_REQUEST
    other = request_frame(0, z, model)  # the body names expert 0, the topic is expert 2's
    assert _error(_ask(requester, other)) == ErrorCode.UNKNOWN_EXPERT
    pixels = np.full((1, *bundle.manifest.input.shape), 0.5, np.float32)  # not integers 0..255
    infer = encode(ExpertRequest(new_correlation_id(), EXPERT, now_ms() + 2000, model, TOPICS.reply("app"), pixels, "fp32"))
    assert _error(_ask(requester, infer, TOPICS.infer_request("device-2"))) == ErrorCode.BAD_REQUEST


def test_a_full_queue_answers_busy_and_every_request_exactly_once(requester: Client, expert_fp32,
                                                                   web_device: WebDevices) -> None:
    bundle, _ = expert_fp32
    before = len(requester.received)
    latent = np.ones((32, bundle.manifest.latent_dim), np.float32)
    frames = [request_frame(EXPERT, latent, model_version(bundle)) for _ in range(60)]
    for frame in frames:  # 60 requests of 32 rows in one burst at a queue of 8
        requester.publish(TOPICS.expert_request(EXPERT), frame)
    replies = requester.wait_for(before + 60, timeout_s=60)[before:]
    time.sleep(0.5)
    assert len(requester.received) == before + 60  # nothing answered twice
    assert {r.correlation_id for _, r in replies} == {decode(f).correlation_id for f in frames}  # type: ignore[union-attr]
    busy = [r for _, r in replies if isinstance(r, ErrorResponse) and r.code == ErrorCode.BUSY]
    answered = [r for _, r in replies if isinstance(r, ExpertResponse)]
    assert busy and answered and len(busy) + len(answered) == 60
    stats = web_device.evaluate("device-2", "return window.nmoe.device.stats()")
    assert stats["expert_server"]["busy"] >= len(busy)


def _malformed(valid: bytes, rng: random.Random, dim: int, model: str) -> list[bytes]:
    """200 payloads a server must not answer normally: junk, truncations, mutations, replies, bad routes."""
    out = [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80))) for _ in range(40)]
    out += [valid[:n] for n in rng.sample(range(len(valid)), 40)]
    for _ in range(60):
        b = bytearray(valid)
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        out.append(bytes(b))
    z = np.zeros((1, dim), np.float32)
    out += [encode(ExpertResponse(new_correlation_id(), EXPERT, 1, np.full((1, 10), 0.1, np.float32)))] * 10
    out += [encode(ErrorResponse(new_correlation_id(), ErrorCode.BUSY, EXPERT, "x"))] * 10
    out += [request_frame(EXPERT, z, model, inbox=inbox) for inbox in
            ["nmoe/other-fleet/reply/app", "nmoe/default/presence/app", "nmoe/default/reply/app/x", "elsewhere"] * 5]
    out += [valid[:30] + b"\xff" * 20, b"NM\x01\x01" + bytes(16) + b"\x02\x00" + b"\xff" * 8 + valid[30:]] * 10
    return out


def test_the_page_survives_200_malformed_frames_and_keeps_answering(requester: Client, expert_fp32,
                                                                     web_device: WebDevices) -> None:
    bundle, expert = expert_fp32
    model, dim = model_version(bundle), bundle.manifest.latent_dim
    before = web_device.evaluate("device-2", "return window.nmoe.device.stats()")
    valid = request_frame(EXPERT, np.ones((1, dim), np.float32), model)
    junk = _malformed(valid, random.Random(3), dim, model)
    assert len(junk) == 200
    for i, payload in enumerate(junk):
        topic = TOPICS.expert_request(EXPERT) if i % 2 else TOPICS.infer_request("device-2")
        requester.publish(topic, payload)
    latent = np.random.default_rng(1).normal(size=(2, dim)).astype(np.float32)
    reply = _ask(requester, request_frame(EXPERT, latent, model), timeout_s=30)
    assert isinstance(reply, ExpertResponse)
    np.testing.assert_allclose(reply.probs, expert(latent), atol=1e-5, rtol=0)
    after = web_device.evaluate("device-2", "return window.nmoe.device.stats()")
    received = sum(after[s]["received"] - before[s].get("received", 0) for s in ("expert_server", "infer_server"))
    assert received == 201
    settled = {s: after[s].get("answered", 0) + after[s]["dropped"] + sum(after[s].get(c, 0) for c in (
        "busy", "bad_request", "wrong_model_version", "deadline_exceeded", "unknown_expert", "internal"))
        for s in ("expert_server", "infer_server")}
    assert settled == {s: after[s]["received"] for s in settled}  # every payload ended in exactly one outcome
    assert after["agent"].get("handler_errors", 0) == 0
    assert web_device.exited() == {}


@pytest.mark.parametrize("damage", ["model_byte", "schema_version"])
def test_a_tampered_bundle_is_refused_with_a_clear_message(damage: str, onnx_tflite_bundles: Path,
                                                           web_broker: RunningBroker, tmp_path: Path) -> None:
    bundles = tmp_path / "bundles"
    shutil.copytree(onnx_tflite_bundles / "device-1", bundles / "device-1")
    if damage == "model_byte":
        path = bundles / "device-1" / "expert.fp32.onnx"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        expected = ["expert.fp32.onnx", "sha256", "tampered"]
    else:
        path = bundles / "device-1" / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["schema_version"] = 3
        path.write_text(json.dumps(manifest))
        expected = ["schema_version 3 is not supported"]
    with pytest.raises(BundleError):  # the Python loader refuses it too
        load_bundle(bundles / "device-1")
    with WebDevices(tmp_path / "web") as web:
        web.start(launch(bundles, "device-1", web_broker, tmp_path / "web"))
        with pytest.raises(Exception, match="web device device-1") as refused:
            web.wait_online(["device-1"], timeout_s=60)
        message = str(refused.value)
        assert all(part in message for part in expected), message
        assert web.exited() == {"device-1": 2}
        assert all(part in (tmp_path / "web" / "logs" / "device-1.log").read_text() for part in expected)


def _lan_address() -> str | None:
    """This machine's address on its network (not loopback), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: the kernel picks the outgoing interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_a_page_loaded_over_plain_http_from_the_lan_verifies_its_bundle_and_serves(
        onnx_tflite_bundles: Path, tmp_path: Path, expert_fp32) -> None:
    """A phone opens http://<LAN address>:PORT/ (README): not a secure context, so no WebCrypto; the
    bundle's sha256 checks and the chunks' digests must work without it."""
    address = _lan_address()
    if address is None:
        pytest.skip("this machine has no network address besides loopback")
    # a broker of its own: the module's device-2 (web_device) stays online on web_broker
    with start_broker(BrokerOptions(tmp_path / "fleet", port=0)) as broker, \
            WebDevices(tmp_path / "web", host=address) as web:
        web.start(launch(onnx_tflite_bundles, "device-2", broker, tmp_path / "web", "--precision", "fp32"))
        assert web.bridge is not None and web.bridge.page_url.startswith(f"http://{address}:")
        web.wait_online(["device-2"], timeout_s=90)
        assert web.evaluate("device-2", "return [isSecureContext, typeof crypto.subtle];") == [False, "undefined"]
        bundle, expert = expert_fp32
        z = np.random.default_rng(3).standard_normal((2, bundle.manifest.latent_dim)).astype(np.float32)
        client = _client(broker, "lan")
        try:
            reply = _ask(client, request_frame(EXPERT, z, model_version(bundle)))
        finally:
            client.close()
        assert isinstance(reply, ExpertResponse) and np.abs(reply.probs - expert(z)).max() < 1e-5
