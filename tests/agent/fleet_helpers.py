"""Helpers of the agent tests: fleets of agents, a raw protocol client, a fake peer."""

import hashlib
import io
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from device_agent.agent import Agent, AgentConfig
from device_agent.bundle import MANIFEST, Bundle, load_bundle
from device_agent.device_models import DeviceModels
from device_agent.nmoe_local import LocalNMoE
from device_agent.wire.clock import now_ms
from device_agent.wire.fleet_view import FleetView
from device_agent.wire.protocol import (
    Caps,
    ExpertRequest,
    ExpertResponse,
    Message,
    Presence,
    Topics,
    decode,
    encode,
    encode_presence,
    new_correlation_id,
)
from device_agent.wire.transport import ConnectionEvent, Transport

TOPICS = Topics()  # the agents' default prefix and fleet
CAPS = Caps(("onnxruntime",), ("fp32", "fp16", "int8"), 32)


def start_agents(bundles: dict[int, Bundle], transport: Callable[[Bundle], Transport],
                 config: AgentConfig | None = None, models: dict[int, DeviceModels] | None = None) -> dict[int, Agent]:
    """Start one agent per bundle and wait until each sees all the others."""
    agents = {e: Agent(b, transport(b), (models or {}).get(e) or DeviceModels.open(b), config)
              for e, b in bundles.items()}
    for agent in agents.values():
        agent.start()
    for agent in agents.values():
        assert agent.wait_for_experts(set(agents), 10), agent.stats()
    return agents


@contextmanager
def running(agents: dict[int, Agent]) -> Iterator[dict[int, Agent]]:
    """Stop every agent at the end."""
    try:
        yield agents
    finally:
        for agent in agents.values():
            agent.stop()


def request_frame(expert: int, latent: np.ndarray, model: str, inbox: str = TOPICS.reply("app"),
                  deadline_ms: int | None = None, encoding: str = "fp32") -> bytes:
    """A REQUEST frame (deadline: 2 s from now)."""
    deadline = now_ms() + 2000 if deadline_ms is None else deadline_ms
    return encode(ExpertRequest(new_correlation_id(), expert, deadline, model, inbox, latent, encoding))


class Client:
    """A raw protocol client (an app, a spy, a fake peer): publishes frames, keeps what arrives."""

    def __init__(self, transport: Transport, filters: tuple[str, ...] = (TOPICS.reply_filter("app"),),
                 on_frame: Callable[["Client", str, bytes], None] | None = None) -> None:
        self.transport = transport
        self.received: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        self._on_frame = on_frame
        self._connected = threading.Event()
        for f in filters:
            transport.subscribe(f)
        transport.connect(None, self._on_message, self._on_connection)
        assert self._connected.wait(10)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.transport.publish(topic, payload, qos=1 if retain else 0, retain=retain)

    def wait_for(self, n: int, timeout_s: float = 5.0) -> list[tuple[str, Message]]:
        """The first n frames received, decoded (AssertionError if fewer arrive in time)."""
        end = time.monotonic() + timeout_s
        with self._cond:
            while len(self.received) < n and self._cond.wait(max(0.0, end - time.monotonic())):
                pass
            assert len(self.received) >= n, f"{len(self.received)} of {n} frames arrived"
            return [(topic, decode(payload)) for topic, payload in self.received[:n]]

    def wait_for_reply(self, correlation_id: bytes, timeout_s: float = 5.0) -> Message:
        """The frame received for `correlation_id` (AssertionError if it does not arrive in time)."""
        end = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for _, payload in self.received:
                    msg = decode(payload)
                    if getattr(msg, "correlation_id", None) == correlation_id:
                        return msg
                assert self._cond.wait(max(0.0, end - time.monotonic())), f"no reply to {correlation_id.hex()}"

    def close(self) -> None:
        self.transport.close()

    def _on_connection(self, event: ConnectionEvent, detail: str) -> None:
        if event in (ConnectionEvent.CONNECTED, ConnectionEvent.RECONNECTED):
            self._connected.set()

    def _on_message(self, topic: str, payload: bytes) -> None:
        with self._cond:
            self.received.append((topic, payload))
            self._cond.notify_all()
        if self._on_frame is not None:
            self._on_frame(self, topic, payload)


def fake_peer(transport: Transport, device: str, expert: int, model: str,
              answer: Callable[[ExpertRequest], Message | None]) -> Client:
    """A device that announces `expert` with `model` and answers each request with `answer(request)`
    (None: stays silent) on `{inbox}/{device}`."""

    def serve(client: Client, topic: str, payload: bytes) -> None:
        request = decode(payload)
        assert isinstance(request, ExpertRequest)
        reply = answer(request)
        if reply is not None:
            client.publish(f"{request.reply_topic}/{device}", encode(reply))

    peer = Client(transport, (TOPICS.expert_request(expert),), serve)
    presence = Presence(device, expert, "online", model, CAPS, time.time())
    peer.publish(TOPICS.presence(device), encode_presence(presence), retain=True)
    return peer


def images_by_need(local: LocalNMoE, device: int, expert: int, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(images whose route from `device` includes `expert`, images whose route does not)."""
    chosen = local.route(device, local.latents(device, images))[0]
    needs = (chosen == expert).any(axis=1)
    assert needs.any() and (~needs).any()
    return images[needs], images[~needs]


class TimedApp:
    """An app that sends inference requests to one device and records when each answer arrived."""

    def __init__(self, transport: Transport, device: str, expert: int, model: str) -> None:
        self.device, self.expert, self.model = device, expert, model
        self.arrived: dict[bytes, float] = {}
        self.client = Client(transport, on_frame=self._on_frame)

    def send(self, image: np.ndarray) -> tuple[bytes, float]:
        """Send one uint8 image [C, H, W]: (correlation id, time.monotonic() of sending)."""
        frame = request_frame(self.expert, image[None], self.model, encoding="uint8", deadline_ms=now_ms() + 10_000)
        sent = time.monotonic()
        self.client.publish(TOPICS.infer_request(self.device), frame)
        return decode(frame).correlation_id, sent

    def latency(self, cid: bytes, sent: float, timeout_s: float = 10.0) -> float:
        """Seconds from `sent` to the answer's arrival (it must be a RESPONSE)."""
        assert isinstance(self.client.wait_for_reply(cid, timeout_s), ExpertResponse)
        return self.arrived[cid] - sent

    def _on_frame(self, _client: Client, _topic: str, payload: bytes) -> None:
        self.arrived.setdefault(bytes(payload[4:20]), time.monotonic())


def wait_online(transport: Transport, experts: set[int], model: str, timeout_s: float) -> None:
    """Wait until devices holding every expert of `experts` with `model` are online (their presence)."""
    fleet = FleetView("app")
    watcher = Client(transport, (TOPICS.presence_filter(),),
                     lambda _c, topic, payload: fleet.update(topic.rsplit("/", 1)[1], payload))
    try:
        assert fleet.wait_for(experts, model, timeout_s), f"experts {experts} not online in {timeout_s} s"
    finally:
        watcher.close()


def with_samples(bundle: Bundle, out: Path, change: Callable[[dict[str, np.ndarray]], None]) -> Bundle:
    """A copy of `bundle` in `out` whose samples.npz is changed by `change` (the manifest's sha256 and
    size updated, so that the bundle still verifies)."""
    shutil.copytree(bundle.path, out)
    samples = bundle.samples()
    change(samples)
    buffer = io.BytesIO()
    np.savez(buffer, **samples)
    data = buffer.getvalue()
    (out / "samples.npz").write_bytes(data)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["samples"] |= {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (out / MANIFEST).write_text(json.dumps(manifest))
    return load_bundle(out)
