"""Helpers of the agent tests: fleets of agents, a raw protocol client, a fake peer."""

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from device_agent.agent import Agent, AgentConfig
from device_agent.bundle import Bundle
from device_agent.device_models import DeviceModels
from device_agent.wire.clock import now_ms
from device_agent.wire.protocol import (
    Caps,
    ExpertRequest,
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
