"""The transport seam's pieces: broker URLs, packet sizes, the in-memory broker's MQTT semantics."""

import pytest
from fleet_helpers import Client

from device_agent.wire.memory_transport import MemoryBroker
from device_agent.wire.mqtt_transport import BrokerUrl, BrokerUrlError
from device_agent.wire.transport import Publication, publish_packet_size


@pytest.mark.parametrize(("url", "expected"), [
    ("mqtt://127.0.0.1", BrokerUrl("127.0.0.1", 1883, False)),
    ("mqtt://broker.lan:1884/", BrokerUrl("broker.lan", 1884, False)),
    ("mqtts://broker.lan", BrokerUrl("broker.lan", 8883, True)),
    ("mqtts://[::1]:9000", BrokerUrl("::1", 9000, True)),
])
def test_broker_urls(url: str, expected: BrokerUrl) -> None:
    assert BrokerUrl.parse(url) == expected


@pytest.mark.parametrize("url", ["127.0.0.1:1883", "tcp://h:1883", "mqtt://", "mqtt://h:99999",
                                 "mqtt://u:p@h", "mqtt://h/topic", "mqtt://h?x=1", "mqtt://h:port"])
def test_bad_broker_urls(url: str) -> None:
    with pytest.raises(BrokerUrlError, match="bad broker URL"):
        BrokerUrl.parse(url)


@pytest.mark.parametrize(("payload_size", "expected"), [(0, 1 + 1 + 2 + 4), (121, 1 + 1 + 127),
                                                        (122, 1 + 2 + 128), (20_000, 1 + 3 + 20_006)])
def test_publish_packet_size(payload_size: int, expected: int) -> None:
    assert publish_packet_size("a/bc", bytes(payload_size)) == expected


def test_memory_broker_filters_retains_and_publishes_wills() -> None:
    broker = MemoryBroker()
    broker.publish("f/presence/a", b"old", retain=True)
    broker.publish("f/presence/a", b"a-online", retain=True)
    broker.publish("f/presence/b", b"b-online", retain=True)
    broker.publish("f/presence/b", b"", retain=True)  # deleted
    watcher = Client(broker.transport("watcher"), ("f/presence/+", "f/x/#"))
    broker.settle()
    assert watcher.received == [("f/presence/a", b"a-online")]
    device = broker.transport("device")
    device.connect(Publication("f/presence/d", b"d-offline", 1, True), lambda t, p: None, lambda e, d: None)
    broker.publish("f/x/y/z", b"deep")
    broker.publish("f/presence/a/extra", b"no")  # + matches one level only
    device.kill()
    quiet = broker.transport("quiet")
    quiet.connect(Publication("f/presence/q", b"q-offline", 1, True), lambda t, p: None, lambda e, d: None)
    quiet.close()  # a clean close: no will
    broker.settle()
    assert watcher.received[1:] == [("f/x/y/z", b"deep"), ("f/presence/d", b"d-offline")]
    late = Client(broker.transport("late"), ("f/presence/+",))
    broker.settle()
    assert sorted(late.received) == [("f/presence/a", b"a-online"), ("f/presence/d", b"d-offline")]
    watcher.close()
    late.close()
