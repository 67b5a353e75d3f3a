"""A trial's numbers (trial.json), a short text summary and a self-contained report.html.

`summarize` joins the driver's requests with the agents' `inference` events (matched by the
request's correlation id) and the in-process `LocalNMoE` predictions. A request's **path** is
`local` when only the device's own expert was combined for it and `remote` when at least one
peer expert answered.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from device_agent.nmoe_local import Prediction
from toolkit.fleet.trial_driver import Request, RequestStatus

ANSWERED, ERROR, TIMEOUT = RequestStatus.ANSWERED, RequestStatus.ERROR, RequestStatus.TIMEOUT
NOT_SERVED, INTERRUPTED = RequestStatus.NOT_SERVED, RequestStatus.INTERRUPTED

PATHS = ("local", "remote")
DPI = 110
PATH_COLORS = {"local": "tab:blue", "remote": "tab:orange", "unknown": "tab:gray"}


@dataclass(frozen=True)
class TrialRecord:
    """Everything a trial produced, before it is summarized."""

    options: dict[str, Any]
    devices: dict[str, int]  # device -> the expert it holds
    num_experts: int
    input_bytes: int  # one raw image: C*H*W uint8
    labels: dict[str, np.ndarray]  # every planned sample's label, per device
    expected: dict[str, Prediction]  # LocalNMoE on the same samples
    requests: list[Request]
    presence: list[tuple[float, str, str]]  # (s after the feeding started, device, status)
    facts: dict[str, Any]  # broker, timings, kills, broker restarts, exit statuses, driver counters...
    events_dir: Path  # the agents' <device>.jsonl


# numbers -------------------------------------------------------------------------------------------


def read_events(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of an agent's event file ([] when it wrote none); a torn last line is skipped."""
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # an agent killed while writing
            continue
    return events


def stats(values: Iterable[float]) -> dict[str, float | int | None]:
    """n, mean, median, p95 and p99 (None without values)."""
    v = np.asarray(list(values), dtype=float)
    if not len(v):
        return {"n": 0, "mean": None, "median": None, "p95": None, "p99": None}
    p50, p95, p99 = np.percentile(v, [50, 95, 99])
    return {"n": len(v), "mean": _r(v.mean()), "median": _r(p50), "p95": _r(p95), "p99": _r(p99)}


def path_of(answered: list[int] | None, own: int) -> str:
    """local: only the own expert was combined; remote: a peer answered too; unknown: no agent event."""
    if answered is None:
        return "unknown"
    return "local" if answered == [own] else "remote"


def request_row(r: Request, inference: dict[str, Any] | None, own: int, expected: Prediction) -> dict[str, Any]:
    """One request as trial.json lists it."""
    answered = None if inference is None else inference["requests"][r.id]
    intact = inference is not None and not (inference["missing"] or inference["rerouted"]
                                            or inference["fallback_rows"])
    diff = None if r.probs is None else _r(float(np.abs(r.probs - expected.probs[r.index]).max()), 9)
    return {"device": r.device, "index": r.index, "label": r.label, "status": r.status, "detail": r.detail,
            "predicted": r.predicted, "expected": int(expected.labels[r.index]), "prob_diff": diff,
            "path": path_of(answered, own), "answered": answered, "intact": intact,
            "sent_s": _r(r.sent_s, 6), "rtt_ms": r.rtt_ms,
            "agent_ms": None if inference is None else inference["latency_ms"]["total"],
            "request_bytes": r.request_bytes, "reply_bytes": r.reply_bytes, "id": r.id}


def summarize(record: TrialRecord) -> dict[str, Any]:
    """Every number of the trial (what trial.json holds)."""
    events = {d: read_events(record.events_dir / f"{d}.jsonl") for d in record.devices}
    inferences = {d: [e for e in evs if e.get("event") == "inference"] for d, evs in events.items()}
    served = {cid: e for evs in inferences.values() for e in evs for cid in e.get("requests", {})}
    rows = [request_row(r, served.get(r.id), record.devices[r.device], record.expected[r.device])
            for r in record.requests]
    return {
        "fleet": _fleet(record),
        "timing": _timing(record),
        "counts": _counts(record, rows),
        "accuracy": _accuracy(record, rows),
        "exactness": _exactness(record, rows),
        "latency_ms": _latency(rows),
        "bytes": _bytes(record, rows, inferences),
        "routing": _routing(record, rows),
        "reroutes": _reroutes(inferences),
        "failures": [{k: row[k] for k in ("device", "index", "status", "detail", "sent_s")}
                     for row in rows if row["status"] in (ERROR, TIMEOUT)],
        "agents": _agents(record, events, inferences),
        "driver": record.facts.get("driver", {}),
        "requests": rows,
    }


def _fleet(record: TrialRecord) -> dict[str, Any]:
    f, o = record.facts, record.options
    return {"devices": record.devices, "num_experts": record.num_experts, "broker": f.get("broker"),
            "auth": o["auth"], "runtime": o["runtime"], "precision": f.get("precision"),
            "latent_encoding": o["latent_encoding"], "deadline_ms": o["deadline_ms"], "samples": o["samples"],
            "rate": o["rate"], "run_dir": f.get("run_dir"), "method": f.get("method"),
            "model_version": f.get("model_version"), "pids": f.get("pids", {}), "broker_pids": f.get("broker_pids", []),
            "options": o}


def _timing(record: TrialRecord) -> dict[str, Any]:
    f = record.facts
    kills = []
    for device, at_s in f.get("killed", {}).items():
        offline = [t for t, d, status in record.presence if d == device and status == "offline" and t >= at_s]
        kills.append({"device": device, "at_s": at_s,
                      "offline_after_ms": _r(1000 * (min(offline) - at_s)) if offline else None})
    return {"agents_online_s": f.get("online_s"), "feeding_s": f.get("feeding_s"), "kills": kills,
            "broker_restarts": f.get("broker_restarts", []), "interrupted": f.get("interrupted", False)}


def _counts(record: TrialRecord, rows: list[dict[str, Any]]) -> dict[str, Any]:
    status = Counter(row["status"] for row in rows)
    failures = Counter(row["detail"] or row["status"] for row in rows if row["status"] in (ERROR, TIMEOUT))
    return {"planned": record.facts.get("planned", 0), "sent": sum(1 for row in rows if row["id"]),
            "answered": status[ANSWERED], "failed": status[ERROR] + status[TIMEOUT],
            "not_served": status[NOT_SERVED], "interrupted": status[INTERRUPTED],
            "not_sent": record.facts.get("planned", 0) - len(rows), "failures_by_reason": dict(failures)}


def _accuracy(record: TrialRecord, rows: list[dict[str, Any]]) -> dict[str, Any]:
    devices = list(record.devices)
    per_device = {d: _accuracy_of([r for r in rows if r["device"] == d], record.labels[d],
                                  record.expected[d].labels) for d in devices}
    overall = _accuracy_of(rows, np.concatenate([record.labels[d] for d in devices]),
                           np.concatenate([record.expected[d].labels for d in devices]))
    return {"overall": overall, "per_device": per_device}


def _accuracy_of(rows: list[dict[str, Any]], labels: np.ndarray, expected: np.ndarray) -> dict[str, Any]:
    """Accuracy over MQTT on the answered samples, in-process on the same ones and on all planned samples."""
    answered = [r for r in rows if r["status"] == ANSWERED]
    return {"answered": len(answered), "samples": len(labels),
            "accuracy": _pct(sum(r["predicted"] == r["label"] for r in answered), len(answered)),
            "in_process_accuracy": _pct(sum(r["expected"] == r["label"] for r in answered), len(answered)),
            "in_process_accuracy_all": _pct(int((expected == labels).sum()), len(labels))}


def _exactness(record: TrialRecord, rows: list[dict[str, Any]]) -> dict[str, Any]:
    def of(rs: list[dict[str, Any]]) -> dict[str, Any]:
        answered = [r for r in rs if r["status"] == ANSWERED]
        diffs = [r["prob_diff"] for r in answered]
        return {"compared": len(answered), "mismatches": sum(r["predicted"] != r["expected"] for r in answered),
                "mismatches_intact": sum(r["predicted"] != r["expected"] for r in answered if r["intact"]),
                "degraded": sum(not r["intact"] for r in answered), "max_abs_prob_diff": max(diffs, default=None)}

    total = of(rows)
    return {**total, "exact": total["mismatches_intact"] == 0,
            "per_device": {d: of([r for r in rows if r["device"] == d]) for d in record.devices}}


def _latency(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per answered request: the driver's round trip, and the agent's time for the inference that served it."""
    answered = [r for r in rows if r["status"] == ANSWERED]
    return {"end_to_end": _by_path([(r["path"], r["rtt_ms"]) for r in answered]),
            "agent": _by_path([(r["path"], r["agent_ms"]) for r in answered if r["agent_ms"] is not None])}


def _by_path(pairs: list[tuple[str, float]]) -> dict[str, Any]:
    return {**{p: stats(v for q, v in pairs if q == p) for p in PATHS}, "all": stats(v for _, v in pairs)}


def _bytes(record: TrialRecord, rows: list[dict[str, Any]], inferences: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Bytes on the wire between agents (expert requests + replies) per inference, vs the raw input."""
    per_input = [(path_of(e["answered"], record.devices[d]), (e["bytes_sent"] + e["bytes_received"]) / e["inputs"])
                 for d, evs in inferences.items() for e in evs if e.get("requests")]
    mean = {p: _mean(v for q, v in per_input if q == p) for p in PATHS}
    sent = [r for r in rows if r["id"]]
    answered = [r for r in rows if r["status"] == ANSWERED]
    return {"raw_input": record.input_bytes, "between_agents_per_inference": {**mean, "all": _mean(v for _, v in per_input)},
            "app_request": _mean(r["request_bytes"] for r in sent), "app_reply": _mean(r["reply_bytes"] for r in answered)}


def _routing(record: TrialRecord, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """matrix[device][expert]: the device's answered requests that expert's output was combined into."""
    matrix = {d: [0] * record.num_experts for d in record.devices}
    for r in rows:
        for e in r["answered"] or []:
            matrix[r["device"]][e] += 1
    return {"experts": list(range(record.num_experts)), "matrix": matrix}


def _reroutes(inferences: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    per_device = {d: sum(n for e in evs for n in e["rerouted"].values()) for d, evs in inferences.items()}
    missing = Counter(why for evs in inferences.values() for e in evs for why in e["missing"].values())
    return {"inputs_rerouted": sum(per_device.values()), "per_device": per_device, "experts_missing": dict(missing),
            "fallback_rows": sum(e["fallback_rows"] for evs in inferences.values() for e in evs)}


def _agents(record: TrialRecord, events: dict[str, list[dict[str, Any]]],
            inferences: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    exits = record.facts.get("exit_status", {})
    counters = {d: next((e["counters"] for e in reversed(evs) if e.get("event") == "counters"), None)
                for d, evs in events.items()}
    return {d: {"expert": e, "exit_status": exits.get(d), "inferences": len(inferences[d]),
                "counters": counters[d]} for d, e in record.devices.items()}


def _pct(n: int, total: int) -> float | None:
    return _r(100 * n / total, 2) if total else None


def _mean(values: Iterable[float]) -> float | None:
    v = list(values)
    return _r(sum(v) / len(v), 1) if v else None


def _r(x: float, digits: int = 3) -> float:
    return round(float(x), digits)


# text ------------------------------------------------------------------------------------------


def summary_text(summary: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    f, c, a, x = summary["fleet"], summary["counts"], summary["accuracy"]["overall"], summary["exactness"]
    lat, b, t = summary["latency_ms"]["end_to_end"], summary["bytes"], summary["timing"]
    lines = [
        (f"nmoe trial: {len(f['devices'])} devices x {f['samples']} samples at {f['rate']:g}/s "
        f"({f['runtime']} {f['precision']}, latents {f['latent_encoding']}) on {f['broker']}"),
        f"  answered {c['answered']}/{c['sent']} sent, failed {c['failed']}, not served {c['not_served']}"
        + (f", interrupted {c['interrupted']}, not sent {c['not_sent']}" if t["interrupted"] else ""),
        f"  accuracy {_fmt(a['accuracy'], '%')} (in-process on the same samples {_fmt(a['in_process_accuracy'], '%')})",
        (f"  exactness vs LocalNMoE: {x['mismatches']} mismatch(es) in {x['compared']} "
        f"({x['mismatches_intact']} among the {x['compared'] - x['degraded']} with every chosen expert answering)"),
        "  end-to-end latency median/p95/p99: " + "; ".join(
            f"{p} {_fmt(lat[p]['median'])}/{_fmt(lat[p]['p95'])}/{_fmt(lat[p]['p99'])} ms (n={lat[p]['n']})"
            for p in PATHS),
        (f"  bytes between agents per inference: {_fmt(b['between_agents_per_inference']['all'])} "
        f"(remote path {_fmt(b['between_agents_per_inference']['remote'])}) vs raw input {b['raw_input']}"),
        f"  re-routed inputs: {summary['reroutes']['inputs_rerouted']}",
    ]
    lines += [f"  killed {k['device']} at {k['at_s']:.2f} s; offline presence after {_fmt(k['offline_after_ms'])} ms"
              for k in t["kills"]]
    lines += [f"  broker restarted at {r['at_s']:.2f} s; every live agent online again after "
              f"{_fmt(r.get('outage_s'))} s (the driver reconnected after {_fmt(r.get('driver_reconnect_s'))} s)"
              for r in t["broker_restarts"]]
    return "\n".join(lines)


def _fmt(x: float | None, unit: str = "") -> str:
    return "-" if x is None else f"{x:.2f}{unit}" if isinstance(x, float) else f"{x}{unit}"


# outputs -----------------------------------------------------------------------------------------


def write_outputs(summary: dict[str, Any], out: Path) -> None:
    """trial.json and report.html in `out`."""
    (out / "trial.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "report.html").write_text(render_html(summary))


def render_html(summary: dict[str, Any]) -> str:
    """One page: tables and the plots as embedded PNGs."""
    figures = [("Accuracy per device", accuracy_figure), ("Latency by path", latency_figure),
               ("Bytes on the wire per inference", bytes_figure), ("Routing matrix", routing_figure),
               ("Timeline", timeline_figure)]
    body = [f"<h1>nmoe trial</h1><pre>{html.escape(summary_text(summary))}</pre>",
            "<h2>Devices</h2>" + _table(*_device_table(summary)),
            "<h2>Latency (ms)</h2>" + _table(*_latency_table(summary)),
            "<h2>Re-routes and failures</h2>" + _table(*_failure_table(summary))]
    for title, figure in figures:
        body.append(f"<h2>{title}</h2><img alt='{title}' src='data:image/png;base64,{_png(figure(summary))}'>")
    body.append(f"<h2>Setup</h2><pre>{html.escape(json.dumps(summary['fleet'], indent=1))}</pre>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
             "th{background:#eee}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>nmoe trial</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c) if c is None or isinstance(c, float) else str(c))}"
                                     "</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{cells}</table>"


def _device_table(summary: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    acc, ex = summary["accuracy"]["per_device"], summary["exactness"]["per_device"]
    rows = summary["requests"]
    header = ["device", "expert", "answered", "failed", "not served", "accuracy %", "in-process %", "mismatches",
              "re-routed inputs"]
    body = [[d, e, acc[d]["answered"], sum(r["device"] == d and r["status"] in (ERROR, TIMEOUT) for r in rows),
             sum(r["device"] == d and r["status"] == NOT_SERVED for r in rows), acc[d]["accuracy"],
             acc[d]["in_process_accuracy"], ex[d]["mismatches"], summary["reroutes"]["per_device"].get(d, 0)]
            for d, e in summary["fleet"]["devices"].items()]
    o = summary["accuracy"]["overall"]
    body.append(["all", "", o["answered"], summary["counts"]["failed"], summary["counts"]["not_served"],
                 o["accuracy"], o["in_process_accuracy"], summary["exactness"]["mismatches"],
                 summary["reroutes"]["inputs_rerouted"]])
    return header, body


def _latency_table(summary: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    lat = summary["latency_ms"]
    body = [[label, path, s["n"], s["median"], s["p95"], s["p99"], s["mean"]]
            for source, label in (("end_to_end", "driver round trip"), ("agent", "agent inference"))
            for path, s in lat[source].items()]
    return ["measure", "path", "n", "median", "p95", "p99", "mean"], body


def _failure_table(summary: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    r = summary["reroutes"]
    body = [["inputs re-routed before sending", r["inputs_rerouted"]], [("rows answered by the own expert alone "
             "(every chosen expert lost)"), r["fallback_rows"]]]
    body += [[f"chosen expert left out: {why}", n] for why, n in sorted(r["experts_missing"].items())]
    body += [[f"failed requests: {why}", n] for why, n in sorted(summary["counts"]["failures_by_reason"].items())]
    body.append(["not served (device killed)", summary["counts"]["not_served"]])
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


def accuracy_figure(summary: dict[str, Any]) -> Figure:
    acc = summary["accuracy"]
    names = [*acc["per_device"], "all"]
    rows = [*acc["per_device"].values(), acc["overall"]]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names)), 3.2))
    ax.bar(x - 0.2, [r["accuracy"] or 0 for r in rows], 0.4, label="over MQTT")
    ax.bar(x + 0.2, [r["in_process_accuracy"] or 0 for r in rows], 0.4, label="in-process LocalNMoE")
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylabel("accuracy % (answered samples)")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right")
    return fig


def _legend(ax: Any, **options: Any) -> None:
    """A legend when something was drawn (a trial with no answers draws nothing)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**options)


def latency_figure(summary: dict[str, Any]) -> Figure:
    rows = [r for r in summary["requests"] if r["status"] == ANSWERED]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for ax, key, title in ((axes[0], "rtt_ms", "driver round trip"), (axes[1], "agent_ms", "agent inference")):
        for path in PATHS:
            v = np.sort([r[key] for r in rows if r["path"] == path and r[key] is not None])
            if len(v):
                ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", color=PATH_COLORS[path],
                        label=f"{path} (n={len(v)})")
        _log_scale(ax, "x")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.set_title(title)
        _legend(ax, loc="lower right")
    return fig


def bytes_figure(summary: dict[str, Any]) -> Figure:
    b = summary["bytes"]
    per = b["between_agents_per_inference"]
    bars = [("raw input (C*H*W)", b["raw_input"]), ("app request (image, fp16)", b["app_request"]),
            ("between agents: all", per["all"]), ("between agents: local path", per["local"]),
            ("between agents: remote path", per["remote"])]
    fig, ax = plt.subplots(figsize=(8, 2.6))
    ax.barh([n for n, _ in bars], [v or 0 for _, v in bars], color=["tab:gray", "tab:gray", "tab:green",
                                                                     PATH_COLORS["local"], PATH_COLORS["remote"]])
    for i, (_, v) in enumerate(bars):
        ax.text(v or 0, i, f" {v:.0f}" if v is not None else " -", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("bytes per inference (MQTT packets)")
    return fig


def routing_figure(summary: dict[str, Any]) -> Figure:
    matrix = summary["routing"]["matrix"]
    devices = list(matrix)
    m = np.array([matrix[d] for d in devices])
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * m.shape[1] + 2), max(3, 0.45 * len(devices) + 1)))
    ax.imshow(m, cmap="Blues", aspect="auto")
    for (i, j), n in np.ndenumerate(m):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=8, color="white" if n > m.max() / 2 else "black")
    ax.set_xticks(range(m.shape[1]), summary["routing"]["experts"])
    ax.set_yticks(range(len(devices)), devices)
    ax.set_xlabel("expert whose answer was combined")
    ax.set_ylabel("requesting device")
    return fig


def timeline_figure(summary: dict[str, Any]) -> Figure:
    rows = summary["requests"]
    fig, ax = plt.subplots(figsize=(10, 3.2))
    for path, color in PATH_COLORS.items():
        pts = [(r["sent_s"], r["rtt_ms"]) for r in rows if r["status"] == ANSWERED and r["path"] == path]
        if pts:
            ax.scatter(*zip(*pts, strict=True), s=8, color=color, label=f"answered, {path}")
    edge = ax.get_xaxis_transform()  # y in axes fraction: markers along the top and bottom edges
    for statuses, y, marker, color, label in (((ERROR, TIMEOUT), 0.95, "x", "red", "failed"),
                                              ((NOT_SERVED,), 0.05, "|", "gray", "not served (killed)")):
        at = [r["sent_s"] for r in rows if r["status"] in statuses]
        if at:
            ax.scatter(at, [y] * len(at), marker=marker, color=color, transform=edge, label=label)
    for k in summary["timing"]["kills"]:
        ax.axvline(k["at_s"], color="black", linestyle="--", label=f"kill {k['device']}")
    for r in summary["timing"]["broker_restarts"]:
        ax.axvline(r["at_s"], color="tab:purple", linestyle=":", label="broker restart")
    _log_scale(ax, "y")
    ax.set_xlabel("s into the feeding (request sent)")
    ax.set_ylabel("round trip ms")
    _legend(ax, loc="upper right", fontsize=8)
    return fig
