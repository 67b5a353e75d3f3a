"""The broker's ACL for the operator's channel (protocol §15), checked by deliveries over a real mosquitto: a
device publishes only its own telemetry and reads only its own drain commands; only the operator reads
telemetry and sends drain commands. (mosquitto grants any SUBACK and drops forbidden messages silently.)"""

import threading
import time
from collections.abc import Iterator

import pytest

from broker.accounts import fleet_accounts
from broker.process import BrokerOptions, RunningBroker, start_broker
from device_agent.wire.mqtt_transport import BrokerUrl, MqttSettings, MqttTransport
from device_agent.wire.protocol import Topics
from device_agent.wire.telemetry import drain_filter, drain_topic, telemetry_filter, telemetry_topic
from device_agent.wire.transport import ConnectionEvent

TOPICS = Topics()


class Client:
    """One account's connection, subscribed to every telemetry and drain topic; what it received."""

    def __init__(self, broker: RunningBroker, account: str) -> None:
        self.account, self.received, self.cond = account, [], threading.Condition()
        connected = threading.Event()
        self.transport = MqttTransport(MqttSettings(BrokerUrl.parse(broker.url), account, account,
                                                    broker.credentials[account].password()))
        for topic_filter in (telemetry_filter(TOPICS), drain_filter(TOPICS), TOPICS.presence_filter()):
            self.transport.subscribe(topic_filter, qos=1)
        self.transport.connect(None, self._on_message,
                               lambda event, _: event == ConnectionEvent.CONNECTED and connected.set())
        assert connected.wait(10)

    def _on_message(self, topic: str, payload: bytes) -> None:
        with self.cond:
            self.received.append((topic, payload))
            self.cond.notify_all()

    def got(self, topic: str, payload: bytes, timeout_s: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: (topic, payload) in self.received, timeout_s)


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Client]]:
    options = BrokerOptions(tmp_path_factory.mktemp("fleet"), port=0, auth=True, accounts=fleet_accounts(2))
    with start_broker(options) as broker:
        clients = {a: Client(broker, a) for a in ("device-0", "device-1", "operator")}
        time.sleep(0.5)  # the subscriptions are in
        yield clients
        for c in clients.values():
            c.transport.close()


def publish(clients: dict[str, Client], sender: str, topic: str, payload: bytes) -> None:
    clients[sender].transport.publish(topic, payload, qos=1)


def test_telemetry_goes_from_its_device_to_the_operator_only(clients: dict[str, Client]) -> None:
    publish(clients, "device-0", telemetry_topic(TOPICS, "device-0"), b"t0")
    assert clients["operator"].got(telemetry_topic(TOPICS, "device-0"), b"t0")
    publish(clients, "device-0", telemetry_topic(TOPICS, "device-1"), b"forged")  # another device's topic
    publish(clients, "device-1", telemetry_topic(TOPICS, "device-1"), b"t1")  # a marker after it
    assert clients["operator"].got(telemetry_topic(TOPICS, "device-1"), b"t1")
    assert (telemetry_topic(TOPICS, "device-1"), b"forged") not in clients["operator"].received
    assert not any(t.startswith(f"{TOPICS.base}/telemetry/") for t, _ in clients["device-1"].received)


def test_drain_commands_go_from_the_operator_to_their_device_only(clients: dict[str, Client]) -> None:
    publish(clients, "device-0", drain_topic(TOPICS, "device-1"), b"from a device")
    publish(clients, "operator", drain_topic(TOPICS, "device-1"), b"d1")
    assert clients["device-1"].got(drain_topic(TOPICS, "device-1"), b"d1")
    assert (drain_topic(TOPICS, "device-1"), b"from a device") not in clients["device-1"].received
    assert not clients["device-0"].got(drain_topic(TOPICS, "device-1"), b"d1", timeout_s=0.5)
