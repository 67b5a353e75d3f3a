"""A minimal MQTT 3.1.1 client on one blocking socket, for load generation only.

QoS 0 PUBLISH packets are encoded in advance and sent many per `send()`; incoming PUBLISHes are
parsed from bulk reads; no keep-alive (a benchmark phase lasts seconds). Far cheaper per message
than paho, so a requester does not become the bottleneck on cores it shares with the server it
measures. It only connects (clean session), subscribes to one filter, publishes and reads.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Self

from device_agent.wire.mqtt_transport import BrokerUrl


class MqttError(RuntimeError):
    """The broker refused the connection or the subscription, or closed the connection."""


class LeanMqtt:
    """One connection subscribed to `topic_filter` (QoS 0)."""

    def __init__(self, url: BrokerUrl, client_id: str, topic_filter: str) -> None:
        self.sock = socket.create_connection((url.host, url.port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()
        connect = b"\x00\x04MQTT\x04\x02\x00\x00" + mqtt_string(client_id)  # 3.1.1, clean session, no keep-alive
        self.send(b"\x10" + varint(len(connect)) + connect)
        if self._packet() != (0x20, b"\x00\x00"):
            raise MqttError(f"the broker refused {client_id}")
        subscribe = b"\x00\x01" + mqtt_string(topic_filter) + b"\x00"
        self.send(b"\x82" + varint(len(subscribe)) + subscribe)
        if self._packet() != (0x90, b"\x00\x01\x00"):
            raise MqttError(f"SUBSCRIBE {topic_filter} refused")

    @staticmethod
    def publish_packet(topic: str, payload: bytes) -> bytes:
        """A QoS 0 PUBLISH packet, to be sent (alone or with others) by `send`."""
        body = mqtt_string(topic) + payload
        return b"\x30" + varint(len(body)) + body

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_publishes(self, timeout_s: float) -> list[bytes]:
        """Payloads of the PUBLISH packets of one read (waits up to timeout_s for the first byte)."""
        self.sock.settimeout(timeout_s)
        try:
            data = self.sock.recv(1 << 18)
        except TimeoutError:
            return []
        if not data:
            raise MqttError("the broker closed the connection")
        self.buffer += data
        payloads = []
        while (packet := self._parse()) is not None:
            kind, body = packet
            if kind & 0xF0 == 0x30:
                payloads.append(body[2 + int.from_bytes(body[:2], "big"):])
        return payloads

    def _packet(self) -> tuple[int, bytes]:
        """The next whole packet, reading as needed."""
        while (packet := self._parse()) is None:
            data = self.sock.recv(1 << 16)
            if not data:
                raise MqttError("the broker closed the connection")
            self.buffer += data
        return packet

    def _parse(self) -> tuple[int, bytes] | None:
        """(first byte, body) of the packet at the buffer's start, removed from it; None if incomplete."""
        length, shift, i = 0, 0, 1
        while True:
            if i >= len(self.buffer):
                return None
            byte = self.buffer[i]
            length, shift, i = length | (byte & 0x7F) << shift, shift + 7, i + 1
            if not byte & 0x80:
                break
        if len(self.buffer) < i + length:
            return None
        packet = (self.buffer[0], bytes(self.buffer[i:i + length]))
        del self.buffer[:i + length]
        return packet

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        self.sock.close()


def varint(n: int) -> bytes:
    """MQTT's variable byte integer (remaining length): 7 bits per byte, least significant first."""
    out = bytearray()
    while True:
        n, byte = n >> 7, n & 0x7F
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_string(text: str) -> bytes:
    """u16 big-endian length + UTF-8."""
    data = text.encode("utf-8")
    return len(data).to_bytes(2, "big") + data
