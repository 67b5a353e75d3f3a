"""Agents over a real mosquitto: exact parity with LocalNMoE (with auth + TLS, MQTT 3.1.1 and 5),
compressed latents, refused credentials, and a broker restart in the middle of a run."""

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fleet_helpers import TOPICS, Client, request_frame, running, start_agents

from broker.accounts import OPERATOR, fleet_accounts
from broker.process import BrokerOptions, RunningBroker, start_broker
from device_agent.agent import Agent, AgentConfig
from device_agent.bundle import Bundle
from device_agent.device_models import DeviceModels
from device_agent.nmoe_local import LocalNMoE
from device_agent.wire.events import EventLog
from device_agent.wire.mqtt_transport import BrokerUrl, MqttSettings, MqttTransport, MqttVersion
from device_agent.wire.protocol import ExpertResponse


def settings_for(broker: RunningBroker, account: str, version: MqttVersion = "3.1.1",
                 password: str | None = None) -> MqttSettings:
    """How `account` connects to `broker` (its credentials when the broker has auth / TLS)."""
    cred = broker.credentials.get(account)
    if cred is not None and cred.password_file is not None and password is None:
        password = cred.password()
    return MqttSettings(BrokerUrl.parse(broker.url), f"test-{account}", account if cred else None, password,
                        cred.ca_file if cred else None, cred.cert_file if cred else None,
                        cred.key_file if cred else None, version)


def mqtt_fleet(bundles: dict[int, Bundle], broker: RunningBroker, config: AgentConfig | None = None,
               versions: dict[int, MqttVersion] | None = None) -> dict[int, Agent]:
    versions = versions or {}
    return start_agents(bundles, lambda b: MqttTransport(settings_for(
        broker, b.manifest.device_id, versions.get(b.manifest.expert_id, "3.1.1"))), config)


@pytest.fixture(scope="module")
def plain_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    with start_broker(BrokerOptions(tmp_path_factory.mktemp("fleet"), port=0)) as broker:
        yield broker


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    """Per-device passwords and ACL (a device publishes only its own topics), TLS only."""
    options = BrokerOptions(tmp_path_factory.mktemp("secure-fleet"), port=0, auth=True, tls=True,
                            accounts=fleet_accounts(3))
    with start_broker(options) as broker:
        yield broker


def test_fleet_over_mosquitto_predicts_exactly_like_local_nmoe(
        bundles: dict[int, Bundle], images: np.ndarray, secure_broker: RunningBroker) -> None:
    local = LocalNMoE(bundles, "fp32")
    # a deadline no loaded machine misses: this test is about exact answers (latency: bench/agent)
    with running(mqtt_fleet(bundles, secure_broker, AgentConfig(deadline_ms=30_000), versions={0: "5"})) as agents:
        for e, agent in agents.items():
            nodelay = agent.transport._client.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)  # type: ignore[attr-defined]
            assert nodelay  # Nagle would make a round trip ~40-90 ms (bench/agent measures it)
            for batch in (images, images[:1], images[3:11]):
                result, expected = agent.infer(batch), local.predict(e, batch)
                assert np.array_equal(result.probs, expected.probs), e
                assert np.array_equal(result.experts, expected.experts)
                assert result.missing == {} and result.rerouted == {}
                assert set(result.answered) == set(np.unique(expected.experts).tolist())
        round_trips = [ms for _ in range(50) for ms in agents[0].infer(images[:1]).remote_ms.values()]
        print(f"\nremote expert round trip over mosquitto+TLS, 1 latent: median {np.median(round_trips):.2f} ms, "
              f"p99 {np.percentile(round_trips, 99):.2f} ms")
        app = Client(MqttTransport(settings_for(secure_broker, OPERATOR)), (TOPICS.reply_filter(OPERATOR),))
        app.publish(TOPICS.infer_request("device-1"), request_frame(
            1, images.astype(np.float32), agents[1].model_version, inbox=TOPICS.reply(OPERATOR)))
        (topic, reply), = app.wait_for(1)
        app.close()
    assert topic == TOPICS.reply_from(OPERATOR, "device-1") and isinstance(reply, ExpertResponse)
    assert np.array_equal(reply.probs, local.predict(1, images).probs)


@pytest.mark.parametrize(("encoding", "tolerance"), [("fp16", 2e-3), ("int8", 0.1)])
def test_compressed_latents_stay_close(encoding: str, tolerance: float, bundles: dict[int, Bundle],
                                       images: np.ndarray, plain_broker: RunningBroker) -> None:
    local = LocalNMoE(bundles, "fp32")
    with running(mqtt_fleet(bundles, plain_broker, AgentConfig(latent_encoding=encoding))) as agents:
        for e, agent in agents.items():
            result, expected = agent.infer(images), local.predict(e, images)
            assert result.missing == {} and np.array_equal(result.experts, expected.experts)
            assert np.abs(result.probs - expected.probs).max() < tolerance
            assert np.mean(result.labels == expected.labels) >= 0.9


def test_refused_credentials_are_reported_not_fatal(bundles: dict[int, Bundle], secure_broker: RunningBroker,
                                                    tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    settings = settings_for(secure_broker, "device-0", password="wrong")
    agent = Agent(bundles[0], MqttTransport(settings), DeviceModels.open(bundles[0]), events=EventLog(events))
    agent.start()
    end = time.monotonic() + 10
    while time.monotonic() < end and "connect_refused" not in events.read_text():
        time.sleep(0.05)
    assert not agent.connected.is_set()
    result = agent.infer(bundles[0].samples()["images"])  # still classifies, with its own expert
    agent.stop()
    assert result.answered == (0,)
    refused = [json.loads(line) for line in events.read_text().splitlines() if '"connect_refused"' in line]
    assert refused and "authoriz" in refused[0]["detail"].lower()


def test_agents_reconnect_after_a_broker_restart(bundles: dict[int, Bundle], images: np.ndarray,
                                                tmp_path: Path) -> None:
    options = BrokerOptions(tmp_path / "fleet", port=0)
    broker = start_broker(options)
    local = LocalNMoE(bundles, "fp32")
    try:
        with running(mqtt_fleet(bundles, broker, AgentConfig(deadline_ms=500))) as agents:
            assert agents[0].infer(images).missing == {}
            broker.stop()
            end = time.monotonic() + 5
            while agents[0].connected.is_set() and time.monotonic() < end:
                time.sleep(0.01)
            during = agents[0].infer(images)  # no broker: the own expert alone, at once
            assert during.answered == (0,) and during.latency_ms["total"] < 100
            broker = start_broker(BrokerOptions(options.fleet_dir, port=broker.port))
            assert all(agent.wait_connected(15) for agent in agents.values())
            assert agents[0].wait_for_experts({1, 2}, 10)
            after = agents[0].infer(images)
            assert after.missing == {} and np.array_equal(after.probs, local.predict(0, images).probs)
    finally:
        broker.stop()
