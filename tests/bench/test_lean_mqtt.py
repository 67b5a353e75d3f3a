"""The benchmark's raw-socket MQTT client, against a real mosquitto and byte by byte."""

from pathlib import Path

import pytest

from bench.lean_mqtt import LeanMqtt, MqttError, varint
from broker.process import BrokerOptions, start_broker
from device_agent.wire.mqtt_transport import BrokerUrl
from device_agent.wire.transport import publish_packet_size


@pytest.mark.parametrize(("n", "encoded"), [(0, "00"), (127, "7f"), (128, "8001"), (16383, "ff7f"),
                                            (16384, "808001"), (2097151, "ffff7f"), (2097152, "80808001")])
def test_varint(n: int, encoded: str) -> None:
    assert varint(n).hex() == encoded


@pytest.mark.parametrize("size", [0, 10, 124, 125, 16_000, 20_000])
def test_publish_packets_have_the_size_the_agent_counts(size: int) -> None:
    topic, payload = "nmoe/default/expert/3/req", bytes(size)
    packet = LeanMqtt.publish_packet(topic, payload)
    assert len(packet) == publish_packet_size(topic, payload)
    assert packet[0] == 0x30 and packet.endswith(payload)


def test_publishes_and_reads_back_many_messages_through_mosquitto(tmp_path: Path) -> None:
    with start_broker(BrokerOptions(tmp_path / "fleet", port=0)) as broker:
        url = BrokerUrl.parse(broker.url)
        with LeanMqtt(url, "lean-test", "bench/+/echo") as client:
            payloads = [bytes([i]) * (i * 97 % 3000) for i in range(200)]  # packets split across reads
            client.send(b"".join(LeanMqtt.publish_packet(f"bench/{i % 3}/echo", p) for i, p in enumerate(payloads)))
            got: list[bytes] = []
            while len(got) < len(payloads):
                got += client.read_publishes(5.0) or pytest.fail(f"{len(got)} of {len(payloads)} arrived")
            assert got == payloads
            assert client.read_publishes(0.05) == []  # nothing more, and a timeout is not an error
        with pytest.raises(MqttError, match="closed the connection"):  # mosquitto's answer to a bad filter
            LeanMqtt(url, "lean-test-2", "bad/#/filter")
