"""The agent's view of the fleet, kept from the retained presences on `presence/+`.

A peer is usable when its latest presence is online with this device's model version and it has
not answered WRONG_MODEL_VERSION since. An offline presence, an empty (deleted) retained presence
and a lost broker connection remove peers; an invalid presence changes nothing (and is counted).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection
from dataclasses import dataclass

from device_agent.wire.events import Counters, EventLog
from device_agent.wire.protocol import Caps, Presence, ProtocolError, decode_presence


@dataclass(frozen=True)
class Peer:
    """An online device holding an expert."""

    device: str
    expert: int
    model: str
    caps: Caps
    ts: float
    presence: Presence  # the whole latest presence (protocols, input...)


class FleetView:
    """Online peers by device, for routing and for choosing what to send them."""

    def __init__(self, me: str, events: EventLog | None = None) -> None:
        self.me = me
        self.counters = Counters()
        self._events = events
        self._cond = threading.Condition()
        self._peers: dict[str, Peer] = {}
        self._incompatible: set[str] = set()

    def update(self, device: str, payload: bytes) -> str | None:
        """Apply the presence of `device` (from its topic): "online", "offline", "removed", or None
        when it was ignored (this device's own, or invalid)."""
        self.counters.add("received")
        if device == self.me:
            return None
        status, peer = "removed", None
        if payload:
            try:
                presence = decode_presence(payload)
                if presence.device != device:
                    raise ProtocolError("presence device differs from its topic")
            except ProtocolError as e:
                self.counters.add("invalid")
                if self._events is not None:
                    self._events.malformed("presence", str(e), device)
                return None
            status, peer = presence.status, _online_peer(presence)
        with self._cond:
            self._incompatible.discard(device)
            if peer is None:
                self._peers.pop(device, None)
            else:
                self._peers[device] = peer
            self._cond.notify_all()
        self.counters.add(status)
        return status

    def clear(self) -> None:
        """Forget every peer (the broker connection is lost; retained presences refill it)."""
        with self._cond:
            self._peers.clear()
            self._incompatible.clear()

    def mark_incompatible(self, device: str) -> None:
        """`device` answered WRONG_MODEL_VERSION: skip it until its next presence."""
        with self._cond:
            self._incompatible.add(device)

    def peer(self, expert: int, model: str, avoid: Collection[str] = ()) -> Peer | None:
        """The usable device holding `expert` (the most recently born if several do), not one of `avoid`."""
        with self._cond:
            peers = [p for p in self._usable(model) if p.expert == expert and p.device not in avoid]
        return max(peers, key=lambda p: p.ts, default=None)

    def live_experts(self, model: str, avoid: Collection[str] = ()) -> set[int]:
        """Experts held by at least one usable peer that is not one of `avoid`."""
        with self._cond:
            return {p.expert for p in self._usable(model) if p.device not in avoid}

    def wait_for(self, experts: set[int], model: str, timeout_s: float) -> bool:
        """Wait until every expert in `experts` has a usable peer; False on timeout."""
        end = time.monotonic() + timeout_s
        with self._cond:
            while not experts <= {p.expert for p in self._usable(model)}:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _usable(self, model: str) -> list[Peer]:
        return [p for d, p in self._peers.items() if p.model == model and d not in self._incompatible]


def _online_peer(p: Presence) -> Peer | None:
    """The peer an online presence describes (None for an offline one)."""
    if p.status != "online" or p.model is None or p.caps is None or p.ts is None:
        return None
    return Peer(p.device, p.expert, p.model, p.caps, p.ts, p)
