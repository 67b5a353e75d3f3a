"""An in-process broker and its `Transport`, for fast tests of agent logic without a network.

`MemoryBroker` routes by MQTT topic filters (`+`, `#`), keeps retained messages (an empty retained
payload deletes one) and publishes a client's will when it is `kill`ed. Each `MemoryTransport`
delivers on its own thread, in order, like paho's network thread; `settle()` waits until every
delivery (and whatever it published in turn) has been handled. QoS is accepted and ignored.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from paho.mqtt.client import topic_matches_sub

from device_agent.wire.transport import (
    ConnectionEvent,
    ConnectionHandler,
    MessageHandler,
    Publication,
)


class MemoryBroker:
    """Routes publications between the `MemoryTransport`s it made."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._clients: list[MemoryTransport] = []
        self._retained: dict[str, bytes] = {}

    def transport(self, client_id: str) -> MemoryTransport:
        """A new, not yet connected client."""
        return MemoryTransport(self, client_id)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Deliver to every connected subscriber (each once); keep or delete a retained message."""
        with self._lock:
            if retain and payload:
                self._retained[topic] = payload
            elif retain:
                self._retained.pop(topic, None)
            for client in self._clients:
                if client.matches(topic):
                    client.deliver(topic, payload)

    def restart(self) -> None:
        """Drop every connection, as a broker restart does; clients reconnect at once (retained
        messages survive, as with persistence)."""
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            client.lose_connection()
        for client in clients:
            self.attach(client, ConnectionEvent.RECONNECTED)

    def settle(self, timeout_s: float = 5.0) -> None:
        """Wait until no client has an undelivered message (TimeoutError after `timeout_s`)."""
        done = threading.Event()

        def drain() -> None:
            while True:
                with self._lock:
                    clients = list(self._clients)
                for client in clients:
                    client.inbox.join()
                if all(client.inbox.unfinished_tasks == 0 for client in clients):
                    done.set()
                    return

        threading.Thread(target=drain, daemon=True).start()
        if not done.wait(timeout_s):
            raise TimeoutError(f"memory broker deliveries not handled within {timeout_s} s")

    def attach(self, client: MemoryTransport, event: ConnectionEvent) -> None:
        """Connect `client`: retained messages for its filters, then the connection event."""
        with self._lock:
            self._clients.append(client)
            for topic, payload in self._retained.items():
                if client.matches(topic):
                    client.deliver(topic, payload)
            client.report(event, "memory broker")

    def detach(self, client: MemoryTransport, will: Publication | None) -> None:
        """Disconnect `client`, publishing `will` if the loss was not clean."""
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)
                if will is not None:
                    self.publish(will.topic, will.payload, will.retain)


class MemoryTransport:
    """A `Transport` connected to a `MemoryBroker`."""

    def __init__(self, broker: MemoryBroker, client_id: str) -> None:
        self.broker, self.client_id = broker, client_id
        self.inbox: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._filters: set[str] = set()
        self._will: Publication | None = None
        self._on_message: MessageHandler | None = None
        self._on_connection: ConnectionHandler | None = None
        self._thread = threading.Thread(target=self._deliver_loop, name=f"memory-{client_id}", daemon=True)

    def subscribe(self, topic_filter: str, qos: int = 0) -> None:
        self._filters.add(topic_filter)

    def connect(self, will: Publication | None, on_message: MessageHandler,
                on_connection: ConnectionHandler) -> None:
        self._will, self._on_message, self._on_connection = will, on_message, on_connection
        self._thread.start()
        self.broker.attach(self, ConnectionEvent.CONNECTED)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.broker.publish(topic, bytes(payload), retain)

    def close(self, last: Publication | None = None, timeout_s: float = 2.0) -> None:
        if last is not None:
            self.publish(last.topic, last.payload, last.qos, last.retain)
        self._stop(will=None)

    def kill(self) -> None:
        """Lose the connection abruptly: the broker publishes the will."""
        self._stop(will=self._will)

    def matches(self, topic: str) -> bool:
        """Whether one of this client's filters matches `topic`."""
        return any(topic_matches_sub(f, topic) for f in self._filters)

    def deliver(self, topic: str, payload: bytes) -> None:
        """Queue a message for the handler (called by the broker)."""
        if self._on_message is not None:
            handler = self._on_message
            self.inbox.put(lambda: handler(topic, payload))

    def report(self, event: ConnectionEvent, detail: str) -> None:
        """Queue a connection event for the handler (called by the broker)."""
        if self._on_connection is not None:
            handler = self._on_connection
            self.inbox.put(lambda: handler(event, detail))

    def lose_connection(self) -> None:
        """Disconnected without a will (a broker going away)."""
        self.broker.detach(self, will=None)
        self.report(ConnectionEvent.DISCONNECTED, "memory broker restarted")

    def _stop(self, will: Publication | None) -> None:
        self.broker.detach(self, will)
        self.inbox.put(None)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _deliver_loop(self) -> None:
        while True:
            item = self.inbox.get()
            try:
                if item is None:
                    return
                item()
            finally:
                self.inbox.task_done()
