"""The transport seam between the agent and a broker (like httpx's transports).

The agent speaks only to a `Transport`: `MqttTransport` (paho-mqtt, a real broker) in production,
`MemoryTransport` (an in-process broker) in unit tests. A transport connects in the background and
keeps reconnecting; on every (re)connect it subscribes again to every filter it was given and then
reports the connection, which is when the agent publishes its birth presence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


@dataclass(frozen=True)
class Publication:
    """One message to publish (also a will)."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


class ConnectionEvent(StrEnum):
    """What happened to the connection (the names are the event log's)."""

    CONNECTED = "connect"  # first connection
    RECONNECTED = "reconnect"  # every later one
    DISCONNECTED = "disconnect"
    REFUSED = "connect_refused"  # the broker answered, but not with success (bad credentials...)
    UNREACHABLE = "connect_failed"  # no connection at all (broker down, wrong address, TLS failure)


MessageHandler = Callable[[str, bytes], None]  # (topic, payload), called on the transport's thread
ConnectionHandler = Callable[[ConnectionEvent, str], None]  # (event, detail), same thread


class Transport(Protocol):
    """A broker connection. Handlers run on the transport's own thread and must not block.

    `publish` never blocks and may be called from any thread, including from inside a handler;
    QoS 0 messages published while disconnected are dropped.
    """

    def subscribe(self, topic_filter: str, qos: int = 0) -> None:
        """Subscribe now (if connected) and again on every reconnect."""
        ...

    def connect(self, will: Publication | None, on_message: MessageHandler,
                on_connection: ConnectionHandler) -> None:
        """Start connecting in the background with `will` registered as the last will (None: no will,
        for clients that are not devices, such as a trial driver)."""
        ...

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        """Queue one message for the broker."""
        ...

    def close(self, last: Publication | None = None, timeout_s: float = 2.0) -> None:
        """Publish `last` (waiting up to `timeout_s` for the broker to take it), then disconnect
        cleanly, so the will is not published, and stop the transport's thread."""
        ...


def publish_packet_size(topic: str, payload: bytes) -> int:
    """Bytes of an MQTT 3.1.1 QoS 0 PUBLISH packet carrying `payload` on `topic` (MQTT 5 adds one
    property-length byte); what an agent counts as sent or received on the wire."""
    remaining = 2 + len(topic.encode("utf-8")) + len(payload)
    length_bytes = 1 + (remaining >= 128) + (remaining >= 16_384) + (remaining >= 2_097_152)
    return 1 + length_bytes + remaining
