"""The operator's side of telemetry: every `Telemetry` a connection receives, by device, in order.

`TelemetryCollector.attach(tap)` subscribes a `TappedTransport` (the trial driver's, or a watcher's
own) to `{prefix}/{fleet}/telemetry/+`; the owner of the connection sees none of these messages.
Payloads that do not decode, or whose device differs from the topic's, are dropped and counted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from device_agent.wire.protocol import ProtocolError, Topics
from device_agent.wire.tap import TappedTransport
from device_agent.wire.telemetry import (
    Telemetry,
    decode_telemetry,
    telemetry_device,
    telemetry_filter,
)
from device_agent.wire.transport import publish_packet_size


@dataclass(frozen=True)
class Received:
    """One telemetry as it arrived."""

    at: float  # time.monotonic() on arrival
    telemetry: Telemetry
    packet_bytes: int  # its MQTT PUBLISH packet


class TelemetryCollector:
    """Telemetry by device (thread-safe); `on_update(telemetry)` runs on the transport's thread after each."""

    def __init__(self, topics: Topics, on_update: Callable[[Telemetry], None] | None = None) -> None:
        self.topics, self.on_update = topics, on_update
        self.malformed = 0
        self._cond = threading.Condition()
        self._received: list[Received] = []

    def attach(self, tap: TappedTransport) -> None:
        """Receive the fleet's telemetry on `tap` (before it connects, or at once if it is connected)."""
        tap.tap(telemetry_filter(self.topics), self.deliver)

    def deliver(self, topic: str, payload: bytes) -> None:
        """One message on a telemetry topic."""
        device = telemetry_device(self.topics, topic)
        try:
            telemetry = decode_telemetry(payload)
            if telemetry.device != device:
                raise ProtocolError("telemetry of another device")
        except ProtocolError:
            with self._cond:
                self.malformed += 1
            return
        with self._cond:
            self._received.append(Received(time.monotonic(), telemetry, publish_packet_size(topic, payload)))
            self._cond.notify_all()
        if self.on_update is not None:
            self.on_update(telemetry)

    def received(self) -> list[Received]:
        with self._cond:
            return list(self._received)

    def wait_final(self, devices: Collection[str], timeout_s: float) -> set[str]:
        """Wait until each device's final telemetry has arrived (at most `timeout_s`); the devices without one."""
        def missing() -> set[str]:
            return set(devices) - {r.telemetry.device for r in self._received if r.telemetry.final}

        with self._cond:
            self._cond.wait_for(lambda: not missing(), timeout_s)
            return missing()
