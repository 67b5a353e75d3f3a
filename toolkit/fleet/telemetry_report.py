"""A trial's telemetry: trial.json's `telemetry` section, a table and a figure for report.html.

`telemetry_json` lists every telemetry each device published during the trial, with its arrival
time in seconds after the feeding started, and what telemetry cost: its MQTT bytes against all
MQTT bytes of the device (docs/protocol.md §15.1; the issue's target is < 1 % at the default period).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from toolkit.fleet.telemetry_collector import Received

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def telemetry_json(received: list[Received], t0: float, devices: Collection[str], malformed: int) -> dict[str, Any]:
    """trial.json `telemetry`: `per_device` (device -> every report, in order, `at_s` after the feeding started),
    `cost` (device -> `telemetry_bytes`, `mqtt_bytes`, `share_pct` since the agent started, and the same
    `feeding_*` from its last report before the feeding to its last one), `period_s` (device -> its period),
    `malformed`."""
    per_device: dict[str, list[dict[str, Any]]] = {}
    cost, period = {}, {}
    for device in devices:
        mine = [r for r in received if r.telemetry.device == device]
        per_device[device] = [_row(r, t0) for r in mine]
        if not mine:
            continue
        last = mine[-1]
        sent = sum(r.packet_bytes for r in mine)
        total = _mqtt_bytes(last)
        # while the trial fed the fleet: from the last report before the feeding (the agents' idle start-up,
        # waiting for the others, is not what a device in the field does) to the last one
        before = [r for r in mine if r.at < t0] or mine[:1]
        during = mine[mine.index(before[-1]) + 1:]
        fed = total - _mqtt_bytes(before[-1])
        cost[device] = {"telemetry_bytes": sent, "mqtt_bytes": total, "reports": len(mine),
                        "share_pct": round(100 * sent / total, 3) if total else None,
                        "feeding_telemetry_bytes": sum(r.packet_bytes for r in during), "feeding_mqtt_bytes": fed,
                        "feeding_share_pct": round(100 * sum(r.packet_bytes for r in during) / fed, 3)
                        if during and fed else None}
        period[device] = last.telemetry.period_s
    return {"period_s": period, "cost": cost, "malformed": malformed, "per_device": per_device}


def _mqtt_bytes(r: Received) -> int:
    """Every MQTT byte the device had sent and received when it published `r`, `r` included."""
    return r.telemetry.bytes_sent + r.telemetry.bytes_received + r.packet_bytes


def _row(r: Received, t0: float) -> dict[str, Any]:
    row = asdict(r.telemetry)
    for key in ("device", "period_s", "model"):
        del row[key]
    row["routing"] = {str(e): n for e, n in r.telemetry.routing.items()}
    return {"at_s": round(r.at - t0, 3), **row}


def telemetry_table(telemetry: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The last report of each device, and telemetry's share of its MQTT bytes."""
    header = ["device", "reports", "status", "served infer", "served expert", "requests made", "errors sent",
              "errors received", "p50 ms (last period)", "CPU %", "RSS MB", "reconnects", "on-device accuracy %",
              "telemetry share of MQTT bytes %"]
    body = []
    for device, rows in telemetry.get("per_device", {}).items():
        if not rows:
            body.append([device, 0] + ["-"] * (len(header) - 2))
            continue
        last, cost = rows[-1], telemetry["cost"][device]
        ev = last["eval"]
        body.append([device, len(rows), last["status"], last["served"]["infer"], last["served"]["expert"],
                     last["made"], sum(last["errors_sent"].values()), sum(last["errors_received"].values()),
                     last["latency_ms"]["p50"], last["cpu_pct"], round(last["rss_bytes"] / 2**20, 1),
                     last["reconnects"], None if ev is None else round(100 * ev["correct"] / max(ev["samples"], 1), 2),
                     cost["share_pct"]])
    return header, body


def telemetry_figure(telemetry: dict[str, Any]) -> Figure:
    """Per device over the trial: inference requests served, latency p50 per period, MQTT bytes."""
    import matplotlib.pyplot as plt  # only for report.html (the caller has chosen the backend)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    panels: list[tuple[str, Callable[[dict[str, Any]], float | None]]] = [("inference requests served", lambda r: r["served"]["infer"]),
              ("inference latency p50 (ms, per period)", lambda r: r["latency_ms"]["p50"]),
              ("MQTT bytes sent + received (kB)", lambda r: (r["bytes_sent"] + r["bytes_received"]) / 1000)]
    for ax, (title, value) in zip(axes, panels, strict=True):
        for device, rows in telemetry.get("per_device", {}).items():
            points = [(r["at_s"], value(r)) for r in rows if value(r) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker=".", label=device)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("s after the feeding started")
    if any(telemetry.get("per_device", {}).values()):
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig
