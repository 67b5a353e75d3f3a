"""Fakes for the trial's unit tests on the in-memory broker: devices that answer inference requests
the way a test tells them to, and the agent-process seam of the feeder."""

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from device_agent.wire.events import EventLog
from device_agent.wire.memory_transport import MemoryBroker, MemoryTransport
from device_agent.wire.protocol import (
    Caps,
    ErrorCode,
    ErrorResponse,
    ExpertRequest,
    ExpertResponse,
    Message,
    Presence,
    Topics,
    decode,
    encode,
    encode_presence,
)
from device_agent.wire.transport import ConnectionEvent, Publication
from toolkit.fleet.trial_driver import OPERATOR, TrialDriver

MODEL = "m" * 64
CLASSES = 4
CAPS = Caps(("onnxruntime",), ("fp32",), 32)


def probs_for(image: np.ndarray) -> np.ndarray:
    """What a fake device answers for an image: class = its first pixel mod CLASSES (float32 [1, C])."""
    p = np.full((1, CLASSES), 0.1, np.float32)
    p[0, int(image.flat[0]) % CLASSES] = 0.7
    return p


@dataclass
class Reply:
    """One frame a fake device sends for a request."""

    message: Message
    sender: str  # the device in the reply topic


Behaviour = Callable[[str, ExpertRequest], list[Reply]]  # (device, request) -> what to send back


def answer(device: str, request: ExpertRequest) -> list[Reply]:
    """Answer like an agent: the combined probabilities, from the device asked."""
    return [Reply(ExpertResponse(request.correlation_id, request.expert_id, 10, probs_for(request.latent)), device)]


def silent(device: str, request: ExpertRequest) -> list[Reply]:
    return []


def error(code: ErrorCode) -> Behaviour:
    """Answer every request with an ERROR frame of `code`."""

    def behaviour(device: str, request: ExpertRequest) -> list[Reply]:
        return [Reply(ErrorResponse(request.correlation_id, code, request.expert_id, "no"), device)]
    return behaviour


class FakeDevice:
    """A device on the memory broker: retained presence (offline will), answers `infer/{device}/req`."""

    def __init__(self, broker: MemoryBroker, topics: Topics, device: str, expert: int,
                 behaviour: Behaviour = answer, model: str = MODEL, protocols: tuple[int, ...] | None = None) -> None:
        """`protocols`: the frame versions its presence lists (None: none, which means version 1 only)."""
        self.topics, self.device, self.expert, self.behaviour, self.model = topics, device, expert, behaviour, model
        self.protocols = protocols
        self.requests: list[ExpertRequest] = []
        self.announce = True  # publish an online presence on every (re)connection
        self.transport: MemoryTransport = broker.transport(f"fake-{device}")
        self.transport.subscribe(topics.infer_request(device))
        will = Publication(topics.presence(device), encode_presence(Presence.offline(device, expert)), 1, True)
        self._announced = threading.Event()
        self.transport.connect(will, self._on_message, self._on_connection)
        assert self._announced.wait(5)  # online before anything else happens to it

    def kill(self) -> None:
        """Vanish: the broker publishes the offline will."""
        self.transport.kill()

    def _on_connection(self, event: ConnectionEvent, detail: str) -> None:
        if self.announce and event in (ConnectionEvent.CONNECTED, ConnectionEvent.RECONNECTED):
            presence = Presence(self.device, self.expert, "online", self.model, CAPS, time.time(), self.protocols)
            self.transport.publish(self.topics.presence(self.device), encode_presence(presence), 1, True)
            self._announced.set()

    def _on_message(self, topic: str, payload: bytes) -> None:
        request = decode(payload)
        assert isinstance(request, ExpertRequest)
        self.requests.append(request)
        for reply in self.behaviour(self.device, request):
            self.transport.publish(f"{request.reply_topic}/{reply.sender}", encode(reply.message))


@dataclass
class FakeAgents:
    """The agent-process seam of `Feeder`: `kill` makes the fake device vanish."""

    devices: dict[str, FakeDevice]
    logs: dict[str, object] = field(default_factory=dict)
    killed: list[str] = field(default_factory=list)

    def pid(self, device: str) -> int:
        return 1000 + self.devices[device].expert

    def kill(self, device: str) -> None:
        self.killed.append(device)
        self.devices[device].kill()

    def exited(self) -> dict[str, int]:
        return {}


class SilentBar:
    """The progress bar's interface, drawing nothing."""

    n = 0

    def update(self, k: int) -> None:
        self.n += k


def connected_driver(broker: MemoryBroker, topics: Topics | None = None, events: EventLog | None = None,
                     model: str = MODEL) -> TrialDriver:
    """A trial driver connected to `broker`."""
    driver = TrialDriver(topics or Topics(), model, events or EventLog())
    driver.connect(broker.transport(f"{OPERATOR}-trial"), 5)
    return driver


def image(value: int) -> np.ndarray:
    """A uint8 [1, 2, 2] image whose first pixel is `value`."""
    return np.full((1, 2, 2), value, np.uint8)
