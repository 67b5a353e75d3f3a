"""Two mosquitto brokers bridged by `nmoe broker --bridge-to`: one fleet across both (issue 14).

The hub is a plain broker; the leaf carries the generated `connection` section. Devices 0 and 2 are
on the hub, device 1 on the leaf: every inference that routes to an expert on the other broker
crosses the bridge, and must equal LocalNMoE's exactly with no expert missing.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from fleet_helpers import TOPICS, Client, request_frame, running, start_agents

from broker.bridge import Bridge
from broker.errors import BrokerError
from broker.process import BrokerOptions, RunningBroker, render_config
from device_agent.bundle import Bundle
from device_agent.nmoe_local import LocalNMoE
from device_agent.wire.mqtt_transport import BrokerUrl, MqttSettings, MqttTransport
from device_agent.wire.protocol import ExpertResponse

ON_LEAF = {1}


def transport(broker: RunningBroker, name: str) -> MqttTransport:
    return MqttTransport(MqttSettings(BrokerUrl.parse(broker.url), f"test-{name}"))


def wait_crossing(source: RunningBroker, sink: RunningBroker, timeout_s: float = 10.0) -> None:
    """Wait until a message published on `source` arrives on `sink` (the bridge is up)."""
    probe = TOPICS.presence("bridge-probe").replace("presence", "probe")
    receiver = Client(transport(sink, "probe-rx"), (probe,))
    sender = Client(transport(source, "probe-tx"), ())
    try:
        end = time.monotonic() + timeout_s
        while not receiver.received and time.monotonic() < end:
            sender.publish(probe, b"ping")
            time.sleep(0.1)
        assert receiver.received, f"nothing crossed from {source.url} to {sink.url} in {timeout_s} s"
    finally:
        receiver.close()
        sender.close()


def test_inference_across_the_bridge_equals_local_nmoe(fleet_bundles: dict[int, Bundle],
                                                       brokers: tuple[RunningBroker, RunningBroker]) -> None:
    hub, leaf = brokers
    wait_crossing(leaf, hub)
    wait_crossing(hub, leaf)
    local = LocalNMoE(fleet_bundles, "fp32")
    images = np.concatenate([b.samples()["images"] for b in fleet_bundles.values()])
    with running(start_agents(fleet_bundles, lambda b: transport(
            leaf if b.manifest.expert_id in ON_LEAF else hub, b.manifest.device_id))) as agents:
        crossed = 0
        for e, agent in agents.items():
            result, expected = agent.infer(images), local.predict(e, images)
            assert np.array_equal(result.probs, expected.probs), e
            assert result.missing == {} and result.rerouted == {}
            crossed += sum(1 for peer in result.remote_ms if (peer in ON_LEAF) != (e in ON_LEAF))
        assert crossed  # some answers came over the bridge
        # an app on the hub asks the device on the leaf; the answer comes back across
        app = Client(transport(hub, "app"))
        app.publish(TOPICS.infer_request("device-1"), request_frame(1, images.astype(np.float32),
                                                                    agents[1].model_version))
        (topic, reply), = app.wait_for(1)
        app.close()
    assert topic == TOPICS.reply_from("app", "device-1") and isinstance(reply, ExpertResponse)
    assert np.array_equal(reply.probs, local.predict(1, images).probs)


def wait_until(received: list[tuple[str, bytes]], item: tuple[str, bytes], timeout_s: float = 10.0) -> bool:
    end = time.monotonic() + timeout_s
    while item not in received and time.monotonic() < end:
        time.sleep(0.05)
    return item in received


def test_retained_presence_and_training_topics_cross(brokers: tuple[RunningBroker, RunningBroker]) -> None:
    hub, leaf = brokers
    wait_crossing(leaf, hub)
    device = Client(transport(leaf, "device-9"), ())
    presence = TOPICS.presence("device-9")
    device.publish(presence, b"retained", retain=True)
    fleet_root = presence.rsplit("/", 2)[0]  # nmoe/default
    train = f"{fleet_root}/train/round/7"
    time.sleep(0.5)  # the presence reaches the hub before anyone there subscribes
    late = Client(transport(hub, "late"), (presence, f"{fleet_root}/train/#"))
    try:
        assert wait_until(late.received, (presence, b"retained"))  # retained on the hub for a later subscriber
        device.publish(train, b"update")
        assert wait_until(late.received, (train, b"update"))  # nothing topic-specific in the bridge
    finally:
        device.publish(presence, b"", retain=True)
        device.close()
        late.close()


def test_the_bridge_config_names_the_whole_fleet_namespace(tmp_path: Path) -> None:
    options = BrokerOptions(tmp_path, port=1884, fleet="lab", bridge=Bridge("mqtt://10.0.0.1:1883", "b1", "bridge"))
    conf = render_config(options, 1884)
    assert "\nconnection b1\naddress 10.0.0.1:1883\ntopic nmoe/lab/# both 1\n" in conf
    assert "remote_username bridge" in conf and "remote_password" not in conf
    assert conf.index("connection b1") > conf.index("log_type notice")  # after every global setting
    with pytest.raises(BrokerError, match="mqtt://HOST:PORT"):
        Bridge("http://hub")
    with pytest.raises(BrokerError, match="needs --bridge-username"):
        Bridge("mqtt://hub", password_file=tmp_path / "pw")
