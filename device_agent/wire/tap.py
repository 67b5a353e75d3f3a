"""`TappedTransport`: a `Transport` around another one that counts what crosses it and lends topics out.

It forwards everything to the inner transport and to the owner's handlers, and:
- counts the bytes of every PUBLISH packet sent and received (`publish_packet_size`) and the
  connections (the first and every reconnect);
- delivers messages on the topics given to `tap(topic, handler)` to that handler instead of the
  owner's, so a second component (telemetry's drain command on an agent, the telemetry collector
  on a trial driver) shares one broker connection without the owner knowing its topics;
- passes every outgoing publish through `on_publish` hooks, which may change or drop it, and drops
  incoming messages an `on_receive` hook refuses (counted in `refused`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from device_agent.wire.transport import (
    ConnectionEvent,
    ConnectionHandler,
    MessageHandler,
    Publication,
    Transport,
    publish_packet_size,
)

Rewrite = Callable[[Publication], Publication | None]  # None: do not publish it
Gate = Callable[[str], bool]  # (topic) -> deliver it


class TappedTransport:
    """See the module docstring; thread-safe like the transports it wraps."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self._taps: dict[str, MessageHandler] = {}
        self._connection_taps: list[ConnectionHandler] = []
        self._rewrites: list[Rewrite] = []
        self._gates: list[Gate] = []
        self._sent = self._received = self._connects = self._refused = self._handler_errors = 0

    # counters ------------------------------------------------------------------------------------

    @property
    def bytes_sent(self) -> int:
        with self._lock:
            return self._sent

    @property
    def bytes_received(self) -> int:
        with self._lock:
            return self._received

    @property
    def refused(self) -> int:
        """Incoming messages an `on_receive` hook dropped."""
        with self._lock:
            return self._refused

    @property
    def handler_errors(self) -> int:
        """Exceptions raised by the handlers of `tap` (caught: the connection goes on)."""
        with self._lock:
            return self._handler_errors

    @property
    def reconnects(self) -> int:
        """Connections after the first."""
        with self._lock:
            return max(0, self._connects - 1)

    # hooks ---------------------------------------------------------------------------------------

    def tap(self, topic: str, handler: MessageHandler, qos: int = 0) -> None:
        """Subscribe to `topic` (an exact topic or a filter ending in `/+`) for `handler` alone."""
        with self._lock:
            self._taps[topic] = handler
        self.inner.subscribe(topic, qos)

    def on_connection(self, handler: ConnectionHandler) -> None:
        """Also tell `handler` of every connection event (after the owner)."""
        with self._lock:
            self._connection_taps.append(handler)

    def on_receive(self, gate: Gate) -> None:
        """Drop every later incoming message whose topic `gate` refuses (before any handler sees it)."""
        with self._lock:
            self._gates.append(gate)

    def on_publish(self, rewrite: Rewrite) -> None:
        """Pass every later publish through `rewrite`."""
        with self._lock:
            self._rewrites.append(rewrite)

    # Transport -----------------------------------------------------------------------------------

    def subscribe(self, topic_filter: str, qos: int = 0) -> None:
        self.inner.subscribe(topic_filter, qos)

    def connect(self, will: Publication | None, on_message: MessageHandler,
                on_connection: ConnectionHandler) -> None:
        def message(topic: str, payload: bytes) -> None:
            with self._lock:
                self._received += publish_packet_size(topic, payload)
                handler = self._taps.get(topic) or self._taps.get(topic.rpartition("/")[0] + "/+")
                gates = list(self._gates)
            if not all(gate(topic) for gate in gates):
                with self._lock:
                    self._refused += 1
                return
            if handler is None:
                on_message(topic, payload)
                return
            try:
                handler(topic, payload)
            except Exception:  # noqa: BLE001 -- a lent topic's handler must never take the owner's connection down
                with self._lock:
                    self._handler_errors += 1

        def connection(event: ConnectionEvent, detail: str) -> None:
            with self._lock:
                self._connects += event in (ConnectionEvent.CONNECTED, ConnectionEvent.RECONNECTED)
                taps = list(self._connection_taps)
            on_connection(event, detail)
            for handler in taps:
                handler(event, detail)

        self.inner.connect(will, message, connection)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        p: Publication | None = Publication(topic, payload, qos, retain)
        with self._lock:
            rewrites = list(self._rewrites)
        for rewrite in rewrites:
            if p is None:
                return
            p = rewrite(p)
        if p is None:
            return
        with self._lock:
            self._sent += publish_packet_size(p.topic, p.payload)
        self.inner.publish(p.topic, p.payload, p.qos, p.retain)

    def close(self, last: Publication | None = None, timeout_s: float = 2.0) -> None:
        self.inner.close(last, timeout_s)
