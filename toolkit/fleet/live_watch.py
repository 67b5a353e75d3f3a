"""The live views' broker connection: presence and telemetry of a fleet into a `LiveFleet`.

It logs in like any operator-side client (the `operator` account with `nmoe broker --auth`, which
alone may read telemetry) and only reads: `presence/+` and `telemetry/+`.
"""

from __future__ import annotations

import threading

from device_agent.wire.mqtt_transport import MqttSettings, MqttTransport
from device_agent.wire.protocol import ProtocolError, Topics, decode_presence
from device_agent.wire.tap import TappedTransport
from device_agent.wire.transport import ConnectionEvent
from toolkit.fleet.live_state import LiveFleet
from toolkit.fleet.telemetry_collector import TelemetryCollector


class WatchError(RuntimeError):
    """The watcher cannot connect (one line)."""


class FleetWatcher:
    """Keeps `fleet` up to date from the broker until `close()`; reconnects by itself."""

    def __init__(self, topics: Topics, settings: MqttSettings, fleet: LiveFleet) -> None:
        self.topics, self.fleet = topics, fleet
        self.tap = TappedTransport(MqttTransport(settings))
        self.telemetry = TelemetryCollector(topics, on_update=fleet.telemetry)
        self.telemetry.attach(self.tap)
        self.tap.subscribe(topics.presence_filter(), qos=1)
        self._first = threading.Event()
        self._outcome: tuple[ConnectionEvent, str] | None = None

    def start(self, timeout_s: float) -> None:
        """Connect; WatchError when the broker refuses, cannot be reached, or does not answer in time."""
        self.tap.connect(None, self._on_message, self._on_connection)
        if not self._first.wait(timeout_s):
            self.tap.close()
            raise WatchError(f"no answer from the broker within {timeout_s:g} s")
        event, detail = self._outcome  # type: ignore[misc]
        if event in (ConnectionEvent.REFUSED, ConnectionEvent.UNREACHABLE):
            self.tap.close()
            raise WatchError(f"cannot connect to the broker: {detail}")

    def close(self) -> None:
        self.tap.close()

    def _on_connection(self, event: ConnectionEvent, detail: str) -> None:
        if self._outcome is None:
            self._outcome = (event, detail)
            self._first.set()
        self.fleet.connection(event in (ConnectionEvent.CONNECTED, ConnectionEvent.RECONNECTED))

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            _, device, _ = self.topics.parse(topic)
            presence = decode_presence(payload) if payload else None
            if presence is not None and presence.device != device:
                raise ProtocolError("presence of another device")
        except ProtocolError:
            return  # a view shows what is valid; the devices count what is not
        self.fleet.presence(str(device), presence)
