"""The terminal live view (`nmoe fleet watch`): a `rich` rendering of a `LiveFleet` snapshot."""

from __future__ import annotations

import threading
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from toolkit.fleet.live_state import LiveFleet

STATUS_STYLES = {"online": "green", "offline": "red", "drained": "yellow", "removed": "dim", "unknown": "dim"}


def render(snapshot: dict[str, Any]) -> Group:
    """Header, one row per device, the routing matrix and the totals."""
    s, totals = snapshot, snapshot["totals"]
    head = Text.assemble(
        ("nmoe fleet watch ", "bold"), f"{s['broker']}  ",
        ("connected" if s["connected"] else "disconnected", "green" if s["connected"] else "red"),
        f"  online {s['online']}/{s['devices_known']}  up {s['uptime_s']:.0f} s\n",
        "models: " + ("; ".join(f"{m[:12]} ({len(d)})" for m, d in s["models"].items()) or "-"))
    devices = Table(title="devices (counters since each agent started; latency of its last telemetry period)",
                    title_justify="left")
    columns = ["device", "expert", "status", "model", "served infer", "served expert", "made", "p50 ms", "p95 ms",
               "p99 ms", "errors", "queue", "CPU %", "RSS MB", "reconn", "acc %"]
    for c in columns:
        devices.add_column(c, justify="left" if c in ("device", "status", "model") else "right", no_wrap=True,
                           overflow="fold")
    for r in s["devices"]:
        errors = None if r["errors_sent"] is None else r["errors_sent"] + r["errors_received"]
        devices.add_row(r["device"], _v(r["expert"]), Text(r["status"], STATUS_STYLES.get(r["status"], "")),
                        (r["model"] or "-")[:12], _v(r["served_infer"]), _v(r["served_expert"]), _v(r["made"]),
                        _v(r["p50"]), _v(r["p95"]), _v(r["p99"]), _v(errors),
                        _v(r["queue"]), _v(r["cpu_pct"]), _v(r["rss_mb"]), _v(r["reconnects"]), _v(r["accuracy"]))
    routing = Table()
    routing.add_column("device", no_wrap=True)
    experts = s["routing"]["experts"]
    for e in experts:
        routing.add_column(f"e{e}", justify="right")
    for device, row in s["routing"]["matrix"].items():
        routing.add_row(device, *(str(n) for n in row))
    foot = Text(f"served: {totals['served_infer']} inference requests, {totals['served_expert']} expert requests;  "
                f"errors: {totals['errors_sent']} answered, {totals['errors_received']} received")
    return Group(head, devices, Text("routing matrix (inputs of each device combined with each expert)", "italic"),
                 routing, foot)


def run_terminal(fleet: LiveFleet, stop: threading.Event, refresh_s: float = 0.5, console: Console | None = None) -> None:
    """Redraw the view every `refresh_s` until `stop` is set."""
    with Live(render(fleet.snapshot()), console=console, auto_refresh=False, screen=True) as live:
        while not stop.wait(refresh_s):
            live.update(render(fleet.snapshot()), refresh=True)


def _v(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)
