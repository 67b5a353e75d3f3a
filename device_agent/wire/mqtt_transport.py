"""`MqttTransport`: the agent's broker connection over paho-mqtt 2.x (MQTT 3.1.1 or 5, TLS optional).

paho's network loop runs in its own thread (`loop_start`): it connects, reconnects after a loss
with capped exponential backoff (paho's `reconnect_delay_set`, reset after each success) and calls
the handlers. On every connect the transport sets TCP_NODELAY on the socket (without it a QoS 1
round trip takes ~90 ms instead of ~0.4 ms), subscribes again to every filter, then reports the
connection. In paho 2 `publish` from another thread, or from a handler, only queues the packet and
wakes the loop, so it never blocks.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.wire.transport import (
    ConnectionEvent,
    ConnectionHandler,
    MessageHandler,
    Publication,
)

MqttVersion = Literal["3.1.1", "5"]
MQTT_VERSIONS: tuple[MqttVersion, ...] = ("3.1.1", "5")
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


class BrokerUrlError(ValueError):
    """A broker URL that is not mqtt://HOST[:PORT] or mqtts://HOST[:PORT]."""


@dataclass(frozen=True)
class BrokerUrl:
    """Where the broker listens; `tls` for mqtts://."""

    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerUrl:
        """mqtt://HOST[:PORT] (default 1883) or mqtts://HOST[:PORT] (TLS, default 8883)."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise BrokerUrlError(f"bad broker URL {url!r}: {e}") from None
        if parts.scheme not in DEFAULT_PORTS:
            raise BrokerUrlError(f"bad broker URL {url!r}: the scheme must be mqtt:// or mqtts://")
        if not parts.hostname or parts.username or parts.password:
            raise BrokerUrlError(f"bad broker URL {url!r}: expected mqtt[s]://HOST[:PORT] (credentials "
                                 "go in --username / --password-file)")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise BrokerUrlError(f"bad broker URL {url!r}: no path, query or fragment allowed")
        return cls(parts.hostname, port or DEFAULT_PORTS[parts.scheme], parts.scheme == "mqtts")


@dataclass(frozen=True)
class MqttSettings:
    """How to reach and log in to the broker."""

    url: BrokerUrl
    client_id: str
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None  # None with mqtts://: the system's CA certificates
    tls_cert: Path | None = None  # client certificate (with tls_key) for brokers that require one
    tls_key: Path | None = None
    mqtt_version: MqttVersion = "3.1.1"
    keepalive_s: int = 30
    reconnect_min_s: float = 0.25
    reconnect_max_s: float = 30.0


class MqttTransport:
    """A `Transport` over paho-mqtt: clean session, background loop, automatic reconnect."""

    def __init__(self, settings: MqttSettings) -> None:
        self.settings = settings
        v5 = settings.mqtt_version == "5"
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=settings.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, clean_session=None if v5 else True)
        if settings.username is not None:
            self._client.username_pw_set(settings.username, settings.password)
        if settings.url.tls:
            self._client.tls_set(
                ca_certs=_path(settings.tls_ca), certfile=_path(settings.tls_cert),
                keyfile=_path(settings.tls_key))
        self._client.reconnect_delay_set(settings.reconnect_min_s, settings.reconnect_max_s)  # type: ignore[arg-type]
        self._client.on_socket_open = _set_nodelay
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_message = self._on_message
        self._lock = threading.Lock()
        self._filters: dict[str, int] = {}
        self._connected = False
        self._ever_connected = False
        self._message_handler: MessageHandler | None = None
        self._connection_handler: ConnectionHandler | None = None

    def subscribe(self, topic_filter: str, qos: int = 0) -> None:
        with self._lock:
            self._filters[topic_filter] = qos
            connected = self._connected
        if connected:
            self._client.subscribe(topic_filter, qos)

    def connect(self, will: Publication | None, on_message: MessageHandler,
                on_connection: ConnectionHandler) -> None:
        self._message_handler, self._connection_handler = on_message, on_connection
        if will is not None:
            self._client.will_set(will.topic, will.payload, will.qos, will.retain)
        url = self.settings.url
        if self.settings.mqtt_version == "5":
            self._client.connect_async(url.host, url.port, self.settings.keepalive_s, clean_start=True)
        else:
            self._client.connect_async(url.host, url.port, self.settings.keepalive_s)
        self._client.loop_start()  # retries the first connection too

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self._client.publish(topic, payload, qos, retain)

    def close(self, last: Publication | None = None, timeout_s: float = 2.0) -> None:
        if last is not None and self._connected:
            info = self._client.publish(last.topic, last.payload, last.qos, last.retain)
            with contextlib.suppress(RuntimeError, ValueError):  # not queued: the will covers it
                info.wait_for_publish(timeout_s)
        self._client.disconnect()
        self._client.loop_stop()

    # paho callbacks (VERSION2 signatures), on paho's loop thread -----------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            self._report(ConnectionEvent.REFUSED, str(reason))
            return
        with self._lock:
            self._connected = True
            filters = list(self._filters.items())
            event = ConnectionEvent.RECONNECTED if self._ever_connected else ConnectionEvent.CONNECTED
            self._ever_connected = True
        if filters:
            client.subscribe(filters)
        url = self.settings.url
        self._report(event, f"{url.host}:{url.port} MQTT {self.settings.mqtt_version}")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        with self._lock:
            was_connected, self._connected = self._connected, False
        if was_connected:
            self._report(ConnectionEvent.DISCONNECTED, str(reason))

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        url = self.settings.url
        self._report(ConnectionEvent.UNREACHABLE, f"nothing answers at {url.host}:{url.port}")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self._message_handler is not None:
            try:
                topic = message.topic
            except UnicodeDecodeError:  # brokers check topics are UTF-8; "" counts as an unknown topic
                topic = ""
            self._message_handler(topic, bytes(message.payload))  # bytes(bytes) is no copy

    def _report(self, event: ConnectionEvent, detail: str) -> None:
        if self._connection_handler is not None:
            self._connection_handler(event, detail)


def _set_nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """paho's on_socket_open: disable Nagle before the CONNECT packet is sent (paho types `sock` as its
    SocketLike protocol; it is a socket.socket or an ssl.SSLSocket)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _path(p: Path | None) -> str | None:
    return None if p is None else str(p)
