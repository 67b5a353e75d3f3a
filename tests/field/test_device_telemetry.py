"""The agent's telemetry, drain command and on-device evaluation (device_agent/telemetry.py), in memory."""

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.bundle import Bundle
from device_agent.device_models import DeviceModels
from device_agent.nmoe_local import LocalNMoE
from device_agent.telemetry import DeviceTelemetry, EvalSamples, TelemetryEvents
from device_agent.wire.clock import now_ms
from device_agent.wire.memory_transport import MemoryBroker
from device_agent.wire.protocol import ExpertRequest, Topics, decode_presence, encode
from device_agent.wire.tap import TappedTransport
from device_agent.wire.telemetry import (
    Drain,
    LatencyWindow,
    Telemetry,
    decode_telemetry,
    drain_topic,
    encode_drain,
    telemetry_device,
    telemetry_filter,
)

TOPICS = Topics()


class Operator:
    """The operator's side in memory: every telemetry and presence it receives; it sends drain commands."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.transport = broker.transport("operator")
        self.telemetry: list[Telemetry] = []
        self.presence: dict[str, str] = {}
        self._cond = threading.Condition()
        self.transport.subscribe(telemetry_filter(TOPICS))
        self.transport.subscribe(TOPICS.presence_filter())
        self.transport.connect(None, self._on_message, lambda *_: None)

    def _on_message(self, topic: str, payload: bytes) -> None:
        with self._cond:
            if telemetry_device(TOPICS, topic) is not None:
                self.telemetry.append(decode_telemetry(payload))
            elif payload:
                p = decode_presence(payload)
                self.presence[p.device] = p.status
            self._cond.notify_all()

    def wait(self, ready: "callable", timeout_s: float = 10.0) -> None:  # type: ignore[valid-type]
        with self._cond:
            assert self._cond.wait_for(ready, timeout_s), (self.presence, self.telemetry[-3:])

    def latest(self, device: str) -> Telemetry:
        with self._cond:
            return [t for t in self.telemetry if t.device == device][-1]

    def drain(self, device: str, for_s: float) -> None:
        self.transport.publish(drain_topic(TOPICS, device), encode_drain(Drain(device, for_s, time.time())), qos=1)


@contextmanager
def field_fleet(bundles: dict[int, Bundle], broker: MemoryBroker, period_s: float = 0.2,
                eval_samples: dict[int, EvalSamples] | None = None) -> Iterator[dict[int, tuple[Agent, DeviceTelemetry]]]:
    """Agents with telemetry (as `nmoe agent` sets them up), each seeing all the others."""
    fleet = {}
    for e, b in bundles.items():
        tap, events = TappedTransport(broker.transport(b.manifest.device_id)), TelemetryEvents()
        agent = Agent(b, tap, DeviceModels.open(b), events=events)
        telemetry = DeviceTelemetry(agent, tap, events, period_s, (eval_samples or {}).get(e), eval_rate=200)
        telemetry.start()
        agent.start()
        fleet[e] = agent, telemetry
    try:
        for agent, _ in fleet.values():
            assert agent.wait_for_experts(set(fleet), 10)
        yield fleet
    finally:
        for agent, telemetry in fleet.values():
            telemetry.stop()
            agent.stop()


def test_telemetry_counts_what_the_fleet_did(field_bundles: dict[int, Bundle]) -> None:
    broker = MemoryBroker()
    operator = Operator(broker)
    images = field_bundles[0].samples()["images"]
    with field_fleet(field_bundles, broker) as fleet:
        agent0, _ = fleet[0]
        results = [agent0.infer(images[i:i + 1]) for i in range(len(images))]
        broker.settle()
    final = {e: operator.latest(f"device-{e}") for e in fleet}
    assert all(t.final and t.status == "serving" for t in final.values())
    assert final[0].inputs == len(images) and final[0].made == sum(len(r.answered) - 1 for r in results)
    served_by_peers = sum(t.served["expert"] for t in final.values())
    assert served_by_peers == sum(t.made for t in final.values()) == final[0].made > 0
    expected_routing: dict[int, int] = {}
    for r in results:
        for e in r.answered:
            expected_routing[e] = expected_routing.get(e, 0) + 1
    assert final[0].routing == expected_routing
    windows = [t for t in operator.telemetry if t.device == "device-0"]
    assert sum(t.latency_ms.n for t in windows) == len(images)  # every inference in exactly one window
    assert [t.seq for t in windows] == list(range(len(windows)))
    assert all(t.errors_sent == {} and t.errors_received == {} and t.queue == {"expert": 0, "infer": 0}
               for t in final.values())
    assert final[0].bytes_sent > 0 and final[0].bytes_received > 0 and final[0].rss_bytes > 10 << 20
    assert final[0].model == agent0.model_version and final[0].reconnects == 0


def test_a_drained_device_goes_offline_drops_requests_and_comes_back(field_bundles: dict[int, Bundle]) -> None:
    broker = MemoryBroker()
    operator = Operator(broker)
    images = field_bundles[0].samples()["images"]
    with field_fleet(field_bundles, broker) as fleet:
        agent0, _ = fleet[0]
        agent1, telemetry1 = fleet[1]
        operator.drain("device-1", 1.5)
        operator.wait(lambda: operator.presence.get("device-1") == "offline")
        operator.wait(lambda: any(t.device == "device-1" and t.status == "drained" for t in operator.telemetry))
        result = agent0.infer(images)  # device-1 is offline to the fleet: its expert is re-routed, nothing fails
        assert 1 not in result.answered and result.fallback_rows == 0 and result.missing == {}
        broker.restart()  # a reconnect while drained publishes the offline presence, not the birth
        broker.settle()
        assert operator.presence["device-1"] == "offline" and telemetry1.drained
        refused = agent1.transport.refused  # type: ignore[attr-defined]
        request = ExpertRequest(bytes(16), 1, now_ms() + 1000, agent1.model_version, TOPICS.reply("operator"),
                                np.zeros((1, field_bundles[1].manifest.latent_dim), np.float32))
        operator.transport.publish(TOPICS.expert_request(1), encode(request))
        broker.settle()
        assert agent1.transport.refused == refused + 1  # type: ignore[attr-defined]
        assert agent1.expert_server.stats().get("received", 0) == 0
        operator.wait(lambda: operator.presence.get("device-1") == "online", 10)
        operator.wait(lambda: operator.latest("device-1").status == "serving")
        assert not telemetry1.drained
        assert agent0.wait_for_experts({1}, 5)


def test_a_drain_of_0_s_ends_a_drain_and_bad_commands_change_nothing(field_bundles: dict[int, Bundle]) -> None:
    broker = MemoryBroker()
    operator = Operator(broker)
    with field_fleet({e: field_bundles[e] for e in (0, 1)}, broker) as fleet:
        _, telemetry1 = fleet[1]
        operator.transport.publish(drain_topic(TOPICS, "device-1"), b'{"v":1,"device":"device-1","for_s":-5}')
        operator.transport.publish(drain_topic(TOPICS, "device-1"),  # another device's command on its topic
                                   encode_drain(Drain("device-0", 60, time.time())))
        broker.settle()
        assert not telemetry1.drained and operator.presence["device-1"] == "online"
        operator.drain("device-1", 3600)
        operator.wait(lambda: operator.presence.get("device-1") == "offline")
        operator.drain("device-1", 0)
        operator.wait(lambda: operator.presence.get("device-1") == "online")
        assert not telemetry1.drained


def test_on_device_accuracy_from_the_device_s_own_labelled_samples(field_bundles: dict[int, Bundle]) -> None:
    broker = MemoryBroker()
    operator = Operator(broker)
    samples = field_bundles[2].samples()
    own = EvalSamples(samples["images"], samples["labels"].astype(np.int64))
    expected = LocalNMoE(field_bundles, "fp32").predict(2, own.images).labels
    with field_fleet(field_bundles, broker, eval_samples={2: own}):
        operator.wait(lambda: any(t.eval is not None and t.eval.samples == len(own.labels)
                                  for t in operator.telemetry), 30)
    final = operator.latest("device-2")
    assert final.eval is not None and final.eval.samples == len(own.labels)
    assert final.eval.correct == int((expected == own.labels).sum())


@pytest.mark.parametrize("images, labels, reason", [
    (np.zeros((2, 1, 16, 16), np.float32), np.zeros(2, np.int64), "expected uint8 images"),
    (np.zeros((2, 1, 16, 16), np.uint8), np.array([0, 99]), "labels 0..9"),
    (np.zeros((2, 1, 8, 8), np.uint8), np.zeros(2, np.int64), "expected uint8 images"),
])
def test_eval_samples_are_checked(tmp_path, images: np.ndarray, labels: np.ndarray, reason: str) -> None:
    path = tmp_path / "own.npz"
    np.savez(path, images=images, labels=labels)
    with pytest.raises(OSError, match=reason):
        EvalSamples.load(path, (1, 16, 16), 10)
    path.write_bytes(b"not a zip")
    with pytest.raises(OSError, match="not an .npz"):
        EvalSamples.load(path, (1, 16, 16), 10)


def test_nmoe_agent_refuses_bad_eval_samples_and_periods_in_one_line(onnx_tflite_bundles, tmp_path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from toolkit.cli import main

    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 3), np.uint8), labels=np.zeros(2, np.int64))
    base = ["agent", "--bundle", str(onnx_tflite_bundles / "device-0"), "--broker", "mqtt://127.0.0.1:1"]
    assert main([*base, "--eval-samples", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"nmoe: error: --eval-samples {bad}: expected uint8 images"), err
    with pytest.raises(SystemExit) as exit_:
        main([*base, "--telemetry-period", "0"])
    assert exit_.value.code == 2 and "must be > 0" in capsys.readouterr().err


def test_the_tap_survives_a_failing_lent_handler_and_telemetry_an_unexpected_event() -> None:
    broker = MemoryBroker()
    tap = TappedTransport(broker.transport("device-0"))
    seen: list[str] = []

    def broken(topic: str, payload: bytes) -> None:
        raise RuntimeError("a bug in a lent handler")

    tap.tap("nmoe/default/drain/device-0", broken)
    tap.connect(None, lambda topic, payload: seen.append(topic), lambda *_: None)
    other = broker.transport("operator")
    other.connect(None, lambda *_: None, lambda *_: None)
    other.publish("nmoe/default/drain/device-0", b"x")
    broker.settle()
    tap.subscribe("nmoe/default/presence/+")
    other.publish("nmoe/default/presence/device-1", b"p")
    broker.settle()
    assert tap.handler_errors == 1 and seen == ["nmoe/default/presence/device-1"]  # the owner still hears
    events = TelemetryEvents()
    events.emit("inference", latency_ms="not a dict", requests={}, answered=[0], inputs=1)
    events.emit("inference", latency_ms={"total": 2.0}, requests={"ab": [0, 2]}, answered=[0, 2], inputs=1)
    assert events.window() == LatencyWindow(1, 2.0, 2.0, 2.0) and events.routing_counts() == {0: 1, 2: 1}
