"""A trial's short text summary and its self-contained report.html, read from its `TrialSummary`."""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from toolkit.fleet.telemetry_report import telemetry_figure, telemetry_table
from toolkit.fleet.trial_driver import RequestStatus
from toolkit.fleet.trial_summary import RequestPath, TrialSummary

DPI = 110
PATH_COLORS = {RequestPath.LOCAL: "tab:blue", RequestPath.REMOTE: "tab:orange", RequestPath.UNKNOWN: "tab:gray"}


# text ------------------------------------------------------------------------------------------


def summary_text(summary: TrialSummary) -> str:
    """A few lines for the terminal."""
    f, c, a, x = summary.fleet, summary.counts, summary.accuracy.overall, summary.exactness
    lat, b, t, r = summary.latency_ms.end_to_end, summary.bytes, summary.timing, summary.reroutes
    lines = [
        (f"nmoe trial: {len(f.devices)} devices x {f.samples} samples at {f.rate:g}/s "
         f"({f.runtime} {f.precision}, latents {f.latent_encoding}) on {f.broker}"),
        f"  answered {c.answered}/{c.sent} sent, failed {c.failed}, not served {c.not_served}"
        + (f", interrupted {c.interrupted}, not sent {c.not_sent}" if t.interrupted else ""),
        f"  accuracy {_fmt(a.accuracy, '%')} (in-process on the same samples {_fmt(a.in_process_accuracy, '%')})",
        (f"  exactness vs LocalNMoE: {x.mismatches} mismatch(es) in {x.compared} "
         f"({x.mismatches_intact} among the {x.compared - x.degraded - x.unverified} with every chosen expert "
         "answering" + (f", {x.mismatches_unverified} among the {x.unverified} no agent event describes"
                        if x.unverified else "") + ")"),
        "  end-to-end latency median/p95/p99: " + "; ".join(
            f"{p} {_fmt(s.median)}/{_fmt(s.p95)}/{_fmt(s.p99)} ms (n={s.n})"
            for p, s in lat.items()),
        (f"  bytes between agents per inference: {_fmt(b.between_agents_per_inference.all)} "
         f"(remote path {_fmt(b.between_agents_per_inference.remote)}) vs raw input {b.raw_input}"),
        (f"  re-routed inputs: {r.inputs_rerouted}; peers not asked because their gate weight is exactly 0: "
         f"{r.zero_weight_skipped} (input, expert) pairs"),
    ]
    if r.avoided:
        lines.append("  left out of routing while their device was suspect: " + ", ".join(
            f"expert {e} in {n} inference(s)" for e, n in r.avoided.items()))
    if f.arm64_devices:
        lines.append("  emulated aarch64 agents (qemu-user): " + ", ".join(
            f"{d} ({cpu})" for d, cpu in f.arm64_devices.items()))
    if f.absent:
        lines.append("  absent, not fed: " + "; ".join(f"{d} ({why})" for d, why in f.absent.items()))
    lines += [f"  killed {k.device} at {k.at_s:.2f} s; offline presence after {_fmt(k.offline_after_ms)} ms"
              for k in t.kills]
    lines += [f"  broker restarted at {restart.at_s:.2f} s; every live agent online again after "
              f"{_fmt(restart.outage_s)} s (the driver reconnected after {_fmt(restart.driver_reconnect_s)} s)"
              for restart in t.broker_restarts]
    return "\n".join(lines)


def _fmt(x: float | None, unit: str = "") -> str:
    return "-" if x is None else f"{x:.2f}{unit}" if isinstance(x, float) else f"{x}{unit}"


# outputs -----------------------------------------------------------------------------------------


def write_outputs(summary: TrialSummary, out: Path) -> None:
    """trial.json and report.html in `out`."""
    (out / "trial.json").write_text(json.dumps(summary.to_json(), indent=1) + "\n")
    (out / "report.html").write_text(render_html(summary))


def render_html(summary: TrialSummary) -> str:
    """One page: tables and the plots as embedded PNGs."""
    figures: list[tuple[str, Callable[[TrialSummary], Figure]]] = [
        ("Accuracy per device", accuracy_figure), ("Latency by path", latency_figure),
        ("Bytes on the wire per inference", bytes_figure), ("Routing matrix", routing_figure),
        ("Timeline", timeline_figure)]
    body = [f"<h1>nmoe trial</h1><pre>{html.escape(summary_text(summary))}</pre>",
            "<h2>Devices</h2>" + _table(*_device_table(summary)),
            "<h2>Latency (ms)</h2>" + _table(*_latency_table(summary)),
            "<h2>Re-routes and failures</h2>" + _table(*_failure_table(summary))]
    if any(summary.telemetry.get("per_device", {}).values()):
        body.append("<h2>Telemetry (each device's last report)</h2>" + _table(*telemetry_table(summary.telemetry)))
        figures.append(("Telemetry over time", lambda s: telemetry_figure(s.telemetry)))
    for title, figure in figures:
        body.append(f"<h2>{title}</h2><img alt='{title}' src='data:image/png;base64,{_png(figure(summary))}'>")
    setup = summary.to_json()["fleet"]
    body.append(f"<h2>Setup</h2><pre>{html.escape(json.dumps(setup, indent=1))}</pre>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
             "th{background:#eee}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>nmoe trial</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")


Table = tuple[list[str], list[list[Any]]]


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c) if c is None or isinstance(c, float) else str(c))}"
                                     "</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{cells}</table>"


def _device_table(summary: TrialSummary) -> Table:
    acc, ex, rows = summary.accuracy.per_device, summary.exactness.per_device, summary.requests
    header = ["device", "expert", "answered", "failed", "not served", "accuracy %", "in-process %", "mismatches",
              "re-routed inputs", "zero-weight peers not asked"]
    routes = summary.reroutes
    body = [[d, e, acc[d].answered, sum(r.device == d and r.status.failed for r in rows),
             sum(r.device == d and r.status == RequestStatus.NOT_SERVED for r in rows), acc[d].accuracy,
             acc[d].in_process_accuracy, ex[d].mismatches, routes.per_device.get(d, 0),
             routes.zero_weight_skipped_per_device.get(d, 0)]
            for d, e in summary.fleet.devices.items()]
    o, c = summary.accuracy.overall, summary.counts
    body.append(["all", "", o.answered, c.failed, c.not_served, o.accuracy, o.in_process_accuracy,
                 summary.exactness.mismatches, routes.inputs_rerouted, routes.zero_weight_skipped])
    return header, body


def _latency_table(summary: TrialSummary) -> Table:
    lat = summary.latency_ms
    body = [[label, path, s.n, s.median, s.p95, s.p99, s.mean]
            for by_path, label in ((lat.end_to_end, "driver round trip"), (lat.agent, "agent inference"))
            for path, s in by_path.items()]
    return ["measure", "path", "n", "median", "p95", "p99", "mean"], body


def _failure_table(summary: TrialSummary) -> Table:
    r = summary.reroutes
    body: list[list[Any]] = [["inputs re-routed before sending", r.inputs_rerouted],
                             ["rows answered by the own expert alone (every chosen expert lost)", r.fallback_rows],
                             ["(input, peer expert) pairs not asked: gate weight exactly 0", r.zero_weight_skipped]]
    body += [[f"inferences that left expert {e} out of routing: its device was suspect", n]
             for e, n in r.avoided.items()]
    body += [[f"chosen expert left out: {why}", n] for why, n in sorted(r.experts_missing.items())]
    body += [[f"failed requests: {why}", n] for why, n in sorted(summary.counts.failures_by_reason.items())]
    body.append(["not served (device killed or absent)", summary.counts.not_served])
    return ["what", "count"], body


# figures -----------------------------------------------------------------------------------------


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _log_scale(ax: Axes, which: str) -> None:
    """A log x or y axis labelled 1, 2, 5, 10, 20... in plain numbers."""
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def accuracy_figure(summary: TrialSummary) -> Figure:
    acc = summary.accuracy
    names = [*acc.per_device, "all"]
    rows = [*acc.per_device.values(), acc.overall]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names)), 3.2))
    ax.bar(x - 0.2, [r.accuracy or 0 for r in rows], 0.4, label="over MQTT")
    ax.bar(x + 0.2, [r.in_process_accuracy or 0 for r in rows], 0.4, label="in-process LocalNMoE")
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylabel("accuracy % (answered samples)")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right")
    return fig


def _legend(ax: Axes, **options: Any) -> None:
    """A legend when something was drawn (a trial with no answers draws nothing)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**options)


def latency_figure(summary: TrialSummary) -> Figure:
    rows = [r for r in summary.requests if r.status == RequestStatus.ANSWERED]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for ax, title, agent in ((axes[0], "driver round trip", False), (axes[1], "agent inference", True)):
        for path in RequestPath:
            ms = [r.agent_ms if agent else r.rtt_ms for r in rows if r.path == path]
            v = np.sort([m for m in ms if m is not None])
            if len(v):
                ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", color=PATH_COLORS[path],
                        label=f"{path} (n={len(v)})")
        _log_scale(ax, "x")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.set_title(title)
        _legend(ax, loc="lower right")
    return fig


def bytes_figure(summary: TrialSummary) -> Figure:
    b = summary.bytes
    per = b.between_agents_per_inference
    bars = [("raw input (C*H*W)", b.raw_input), ("app request (image)", b.app_request),
            ("between agents: all", per.all), ("between agents: local path", per.local),
            ("between agents: remote path", per.remote)]
    fig, ax = plt.subplots(figsize=(8, 2.6))
    ax.barh([n for n, _ in bars], [v or 0 for _, v in bars], color=["tab:gray", "tab:gray", "tab:green",
                                                                     PATH_COLORS[RequestPath.LOCAL],
                                                                     PATH_COLORS[RequestPath.REMOTE]])
    for i, (_, v) in enumerate(bars):
        ax.text(v or 0, i, f" {v:.0f}" if v is not None else " -", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("bytes per inference (MQTT packets)")
    return fig


def routing_figure(summary: TrialSummary) -> Figure:
    matrix = summary.routing.matrix
    devices = list(matrix)
    m = np.array([matrix[d] for d in devices])
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * m.shape[1] + 2), max(3, 0.45 * len(devices) + 1)))
    ax.imshow(m, cmap="Blues", aspect="auto")
    for (i, j), n in np.ndenumerate(m):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=8, color="white" if n > m.max() / 2 else "black")
    ax.set_xticks(range(m.shape[1]), [str(e) for e in summary.routing.experts])
    ax.set_yticks(range(len(devices)), devices)
    ax.set_xlabel("expert whose answer was combined")
    ax.set_ylabel("requesting device")
    return fig


def timeline_figure(summary: TrialSummary) -> Figure:
    rows = summary.requests
    fig, ax = plt.subplots(figsize=(10, 3.2))
    for path, color in PATH_COLORS.items():
        pts = [(r.sent_s, r.rtt_ms) for r in rows
               if r.status == RequestStatus.ANSWERED and r.path == path and r.rtt_ms is not None]
        if pts:
            ax.scatter([t for t, _ in pts], [ms for _, ms in pts], s=8, color=color, label=f"answered, {path}")
    edge = ax.get_xaxis_transform()  # y in axes fraction: markers along the top and bottom edges
    failed = [r.sent_s for r in rows if r.status.failed]
    not_served = [r.sent_s for r in rows if r.status == RequestStatus.NOT_SERVED]
    for at, y, marker, color, label in ((failed, 0.95, "x", "red", "failed"),
                                        (not_served, 0.05, "|", "gray", "not served (killed or absent)")):
        if at:
            ax.scatter(at, [y] * len(at), marker=marker, color=color, transform=edge, label=label)
    for k in summary.timing.kills:
        ax.axvline(k.at_s, color="black", linestyle="--", label=f"kill {k.device}")
    for r in summary.timing.broker_restarts:
        ax.axvline(r.at_s, color="tab:purple", linestyle=":", label="broker restart")
    _log_scale(ax, "y")
    ax.set_xlabel("s into the feeding (request sent)")
    ax.set_ylabel("round trip ms")
    _legend(ax, loc="upper right", fontsize=8)
    return fig
