"""What the live views show: the fleet as its presences and telemetry tell it, as one JSON-ready snapshot.

`LiveFleet` is fed from a broker connection's transport thread (`presence`, `telemetry`) and read
by the views (`snapshot()`, any thread). The snapshot's numbers are the devices' own cumulative
counters from their latest telemetry (requests served, errors, the routing matrix), the latency
percentiles of their latest period, and each device's status: `online` or `offline` from its
presence, `drained` from its telemetry while its presence is offline.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from device_agent.wire.protocol import Presence
from device_agent.wire.telemetry import Telemetry


@dataclass
class _Device:
    expert: int | None = None
    presence: str = "unknown"  # online, offline, removed, unknown (no presence seen)
    model: str | None = None
    telemetry: Telemetry | None = None
    reports: int = 0
    seen_at: float | None = None  # time.monotonic() of the latest telemetry


class LiveFleet:
    """Presence and latest telemetry by device (thread-safe)."""

    def __init__(self, broker: str) -> None:
        self.broker = broker
        self.started = time.monotonic()
        self.connected = False
        self._lock = threading.Lock()
        self._devices: dict[str, _Device] = {}
        self._version = 0  # bumped on every change

    def presence(self, device: str, presence: Presence | None) -> None:
        """A presence (None: the retained presence was deleted)."""
        with self._lock:
            d = self._devices.setdefault(device, _Device())
            if presence is None:
                d.presence = "removed"
            else:
                d.presence, d.expert = presence.status, presence.expert
                d.model = presence.model or d.model
            self._version += 1

    def telemetry(self, t: Telemetry) -> None:
        with self._lock:
            d = self._devices.setdefault(t.device, _Device())
            d.telemetry, d.model, d.seen_at = t, t.model, time.monotonic()
            d.reports += 1
            self._version += 1

    def connection(self, connected: bool) -> None:
        with self._lock:
            self.connected = connected
            self._version += 1

    def snapshot(self) -> dict[str, Any]:
        """Everything the views show (see the module docstring), JSON-ready."""
        now = time.monotonic()
        with self._lock:
            devices = {name: _Device(**vars(d)) for name, d in sorted(self._devices.items())}
            version, connected = self._version, self.connected
        experts = sorted({d.expert for d in devices.values() if d.expert is not None}
                         | {e for d in devices.values() if d.telemetry for e in d.telemetry.routing})
        rows = [_device_row(name, d, now) for name, d in devices.items()]
        models: dict[str, list[str]] = {}
        for name, d in devices.items():
            if d.model is not None and d.presence == "online":
                models.setdefault(d.model, []).append(name)
        return {
            "broker": self.broker, "connected": connected, "version": version,
            "uptime_s": round(now - self.started, 1),
            "online": sum(r["status"] == "online" for r in rows), "devices_known": len(rows),
            "models": models, "devices": rows,
            "routing": {"experts": experts, "matrix": {name: [d.telemetry.routing.get(e, 0) if d.telemetry else 0
                                                              for e in experts] for name, d in devices.items()}},
            "totals": {
                "served_infer": sum(r["served_infer"] or 0 for r in rows),
                "served_expert": sum(r["served_expert"] or 0 for r in rows),
                "errors_sent": sum(r["errors_sent"] or 0 for r in rows),
                "errors_received": sum(r["errors_received"] or 0 for r in rows)},
        }


def _device_row(name: str, d: _Device, now: float) -> dict[str, Any]:
    t = d.telemetry
    status = d.presence
    if t is not None and t.status == "drained" and d.presence != "online":
        status = "drained"
    row: dict[str, Any] = {"device": name, "expert": d.expert, "status": status, "model": d.model,
                           "reports": d.reports, "report_age_s": None if d.seen_at is None else round(now - d.seen_at, 1)}
    if t is None:
        return row | dict.fromkeys(("served_infer", "served_expert", "made", "inputs", "errors_sent",
                                    "errors_received", "errors", "p50", "p95", "p99", "latency_n", "queue", "cpu_pct",
                                    "rss_mb", "reconnects", "accuracy", "eval_samples"))
    errors = {f"sent {k}": v for k, v in t.errors_sent.items()} | {f"received {k}": v
                                                                   for k, v in t.errors_received.items()}
    return row | {
        "served_infer": t.served["infer"], "served_expert": t.served["expert"], "made": t.made, "inputs": t.inputs,
        "errors_sent": sum(t.errors_sent.values()), "errors_received": sum(t.errors_received.values()),
        "errors": errors, "p50": t.latency_ms.p50, "p95": t.latency_ms.p95, "p99": t.latency_ms.p99,
        "latency_n": t.latency_ms.n, "queue": t.queue["expert"] + t.queue["infer"], "cpu_pct": t.cpu_pct,
        "rss_mb": round(t.rss_bytes / 2**20, 1), "reconnects": t.reconnects,
        "accuracy": None if t.eval is None or not t.eval.samples else round(100 * t.eval.correct / t.eval.samples, 2),
        "eval_samples": None if t.eval is None else t.eval.samples}
