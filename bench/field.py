"""Field benchmark: the quick fleet under emulated radio links, written to docs/results/field.md.

    .venv/bin/python -m bench.field [--bundles DIR] [--samples N] [--rate R] [--out docs/results/field.md]

One invocation runs `nmoe trial` (in-process, `toolkit.fleet.trial.run_trial`) on the same fleet and
samples for every scenario and compares each with loopback:

  loopback, wifi, lte, congested           fp32 latents: accuracy, end-to-end latency by path, share
                                           of inputs re-routed, bytes between agents per inference
  lte with fp16 / int8 latents             the same, for the bytes per inference of each encoding
  lte, one device in a 10 s outage         `outage=10s@3s` on --outage-device: the fleet re-routes around it

Links are `toolkit/fleet/link_proxy.py`'s user-space proxies (this kernel has no netem), one per
agent; the trial's driver (the operator's machine) is not behind one. Telemetry: what it cost in MQTT
bytes per device (docs/protocol.md §15.1) at the agents' default period.

Fleet: --bundles (default runs/quick-bundles; when missing, configs/quick.toml is trained with only the
FedGate NMoE, the method `nmoe export` picks, and exported to ONNX into runs/quick and runs/quick-bundles).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import ROOT, log, machine, nmoe, other_load, verdict
from toolkit.fleet.link import PRESETS, parse_link
from toolkit.fleet.trial import TrialOptions, run_trial

OUTAGE, OUTAGE_START_S, OUTAGE_S = "outage=10s@3s", 3.0, 10.0
CROSSINGS = {"remote": 6, "local": 2}  # link crossings of an inference fed from the operator's machine
SLACK_MS = 20.0  # the target: median <= crossings x one-way delay + 20 ms


@dataclass(frozen=True)
class Scenario:
    name: str
    link: str | None  # None: loopback, no proxy
    latent_encoding: str = "fp32"
    link_file: str | None = None  # TOML text, when one device differs


def scenarios(outage_device: str) -> list[Scenario]:
    return [Scenario("loopback", None), Scenario("wifi", "wifi"), Scenario("lte", "lte"),
            Scenario("congested", "congested"), Scenario("lte fp16", "lte", "fp16"), Scenario("lte int8", "lte", "int8"),
            Scenario("lte + 10 s outage", "lte", link_file=f'{outage_device} = "lte,{OUTAGE}"')]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundles", type=Path, default=ROOT / "runs" / "quick-bundles")
    p.add_argument("--samples", type=int, default=60, help="per device (default 60: 15 s at 4/s, longer than "
                   "the outage)")
    p.add_argument("--rate", type=float, default=4.0, help="requests per second per device (default 4)")
    p.add_argument("--outage-device", default="device-3", help="the device whose link fails for 10 s")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "field.md")
    args = p.parse_args()
    started = time.monotonic()
    load_before = other_load()
    if not (args.bundles / "device-0" / "manifest.json").exists():
        log("field", f"{args.bundles} missing: training configs/quick.toml (FedGate only) and exporting it")
        run = args.bundles.parent / "quick"
        nmoe("train", "configs/quick.toml", "--out", str(run), "--quiet", "--set", 'gate.methods=["fedgate"]',
             "--set", "baselines.methods=[]")
        nmoe("export", str(run), "--out", str(args.bundles), "--formats", "onnx", "--quiet")
    work = ROOT / "runs" / "bench" / "field"
    results = {}
    for s in scenarios(args.outage_device):
        out = work / s.name.replace(" ", "-").replace("+", "").replace("--", "-")
        link_file = None
        if s.link_file is not None:
            out.mkdir(parents=True, exist_ok=True)
            link_file = work / f"{out.name}.toml"
            link_file.write_text(s.link_file + "\n")
        log("field", f"{s.name}: trial into {out}")
        result = run_trial(TrialOptions(args.bundles, out, samples=args.samples, rate=args.rate, link=s.link,
                                        link_file=link_file, latent_encoding=s.latent_encoding, show_progress=False))
        results[s.name] = json.loads((result.out / "trial.json").read_text())
        log("field", f"{s.name}: {headline(results[s.name])}")
    text = page(results, args, time.monotonic() - started, load_before, other_load())
    args.out.write_text(text)
    figure(results, args.out.with_suffix(".png"))
    log("field", f"wrote {args.out} and {args.out.with_suffix('.png')}")


def headline(t: dict[str, Any]) -> str:
    e2e, c = t["latency_ms"]["end_to_end"], t["counts"]
    return (f"accuracy {t['accuracy']['overall']['accuracy']}%, median remote {e2e['remote']['median']} ms, "
            f"answered {c['answered']}, failed {c['failed']}")


# numbers -------------------------------------------------------------------------------------------


def rerouted_share(t: dict[str, Any]) -> float | None:
    sent = t["counts"]["sent"]
    return round(100 * t["reroutes"]["inputs_rerouted"] / sent, 2) if sent else None


def telemetry_share(t: dict[str, Any], key: str = "feeding_share_pct") -> tuple[float | None, float | None]:
    shares = [c[key] for c in t["telemetry"]["cost"].values() if c[key] is not None]
    return (round(sum(shares) / len(shares), 3), max(shares)) if shares else (None, None)


def outage_failures(t: dict[str, Any], device: str) -> tuple[int, int]:
    """Failed requests to the device in its outage (no live path exists) and every other failed request."""
    mine = [r for r in t["requests"] if r["status"] in ("error", "timeout")]
    during = [r for r in mine
              if r["device"] == device and OUTAGE_START_S - 1 <= r["sent_s"] <= OUTAGE_START_S + OUTAGE_S]
    return len(during), len(mine) - len(during)


def one_way_ms(s: Scenario) -> float:
    return 0.0 if s.link is None else 1000 * parse_link(s.link).delay_s


def page(results: dict[str, dict[str, Any]], args: argparse.Namespace, wall_s: float, load_before: str,
         load_after: str) -> str:
    base = results["loopback"]
    first = next(iter(results.values()))
    m = machine()
    lines = [
        "# Field benchmark: the quick fleet under emulated radio links", "",
        (f"Command: `{shlex.join(['python', '-m', 'bench.field', *sys.argv[1:]])}` (wrote this file after {wall_s:.0f} s of wall time). "
        f"Fleet: `{args.bundles}` ({len(first['fleet']['devices'])} devices, method `{first['fleet']['method']}`, "
        f"{first['fleet']['runtime']} {first['fleet']['precision']}), {args.samples} personalized test samples per "
        f"device at {args.rate:g} requests/s each, all devices at once, peer deadline "
        f"{first['fleet']['deadline_ms']} ms."), "",
        (f"Machine: {m['processor']}, {m['cpus']} cores, {m['platform']}, Python {m['python']}; {m['mosquitto']}; "
        f"paho-mqtt {m['paho']}; onnxruntime {m['onnxruntime']}."), "",
        (f"Load: at start {load_before}. At end {load_after}. The machine was shared with other work; every agent, "
        "mosquitto, the link proxies and the driver run on its cores, so latencies include that contention."), "",
        "Links (`toolkit/fleet/link.py` presets, one-way, each direction): "
        + "; ".join(f"`{n}` {s.describe()}" for n, s in PRESETS.items() if n != "loopback")
        + f". Outage scenario: `{args.outage_device}` has `lte,{OUTAGE}` (nothing crosses its link from 3 s to 13 s "
        "into the feeding), the others `lte`.", "",
        "## Results", "",
        ("| scenario | accuracy % (in-process) | e2e median / p95 / p99 ms, remote path (n) | local path median ms (n) "
        "| inputs re-routed % | between agents B/inference | answered | failed | not served | exact |"),
        "|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, t in results.items():
        e2e, acc = t["latency_ms"]["end_to_end"], t["accuracy"]["overall"]
        r, loc = e2e["remote"], e2e["local"]
        lines.append(
            f"| {name} | {acc['accuracy']} ({acc['in_process_accuracy']}) | {r['median']} / {r['p95']} / {r['p99']} "
            f"({r['n']}) | {loc['median']} ({loc['n']}) | {rerouted_share(t)} | "
            f"{t['bytes']['between_agents_per_inference']['all']} | {t['counts']['answered']} | {t['counts']['failed']} "
            f"| {t['counts']['not_served']} | {t['exactness']['exact']} |")
    lines += ["", "## Against loopback", "",
              "Each metric divided by loopback's (the figure `field.png` plots the same ratios).", "",
              ("| scenario | accuracy | e2e median (all) | e2e p95 (all) | bytes between agents per inference | "
              "inputs re-routed (pct points) |"), "|---|---:|---:|---:|---:|---:|"]
    for name, t in results.items():
        lines.append(f"| {name} | {_ratio(t, base, 'accuracy')} | {_ratio(t, base, 'median')} | "
                     f"{_ratio(t, base, 'p95')} | {_ratio(t, base, 'bytes')} | "
                     f"{_diff(rerouted_share(t), rerouted_share(base))} |")
    lte = results["lte"]
    one_way = one_way_ms(Scenario("lte", "lte"))
    during, others = outage_failures(results["lte + 10 s outage"], args.outage_device)
    tel_mean, tel_max = telemetry_share(base)
    lines += ["", "## Targets", ""]
    for path in ("remote", "local"):
        median = lte["latency_ms"]["end_to_end"][path]["median"]
        bound = CROSSINGS[path] * one_way + SLACK_MS
        if median is not None:
            lines.append(f"- `lte`, {path} path: end-to-end median {median} ms <= {CROSSINGS[path]} crossings x "
                         f"{one_way:g} ms + {SLACK_MS:g} ms = {bound:g} ms: {verdict(median <= bound)}")
    failed = {n: t["counts"]["failed"] for n, t in results.items() if n != "lte + 10 s outage"}
    lines.append(f"- no failed inference while each input has a live expert: failed requests per scenario "
                 f"{failed}; in the outage scenario {others} failed among inputs with a live path (and {during} "
                 f"sent to {args.outage_device} itself during its outage, which no expert can answer): "
                 f"{verdict(sum(failed.values()) == 0 and others == 0)}")
    if tel_max is not None:
        lines.append(f"- telemetry < 1% of a device's MQTT bytes at the default period (10 s), loopback trial, while "
                     "the trial fed the fleet: mean "
                     f"{tel_mean}%, max {tel_max}% over the devices: {verdict(tel_max < 1)}")
    lines += ["", "## Telemetry cost per scenario", "",
              ("Telemetry's MQTT bytes / every MQTT byte the device sent and received (its own reports' counters), "
               "mean and max over the devices: while the trial fed the fleet (from each device's last report before "
               "the feeding to its final one), and since the agent started (which adds the idle start-up, waiting "
               "for the other agents of the trial to come online: no field device idles like that)."), "",
              "| scenario | feeding: mean % | max % | since start: mean % | max % |", "|---|---:|---:|---:|---:|"]
    for name, t in results.items():
        mean, top = telemetry_share(t)
        all_mean, all_top = telemetry_share(t, "share_pct")
        lines.append(f"| {name} | {mean} | {top} | {all_mean} | {all_top} |")
    outage, device = results["lte + 10 s outage"], args.outage_device
    lines += ["", "## The outage", "",
              f"Requests to {device}: " + ", ".join(
                  f"{k} {v}" for k, v in sorted(_statuses(outage, device).items())) + ". "
              f"Inputs of the other devices re-routed before sending: {outage['reroutes']['inputs_rerouted']}; "
              f"chosen experts left out: {outage['reroutes']['experts_missing']}; rows answered by the own expert "
              f"alone: {outage['reroutes']['fallback_rows']}. The broker kept {device} online (10 s is less "
              "than 1.5 x its 30 s keep-alive), so its peers found out by missed deadlines and avoided it for the "
              "suspect back-off (docs/agent.md), as they would a frozen device.", ""]
    return "\n".join(lines)


def _statuses(t: dict[str, Any], device: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in t["requests"]:
        if r["device"] == device:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts


def _metric(t: dict[str, Any], what: str) -> float | None:
    if what == "accuracy":
        value = t["accuracy"]["overall"]["accuracy"]
    elif what == "bytes":
        value = t["bytes"]["between_agents_per_inference"]["all"]
    else:
        value = t["latency_ms"]["end_to_end"]["all"][what]
    return None if value is None else float(value)


def _ratio(t: dict[str, Any], base: dict[str, Any], what: str) -> str:
    a, b = _metric(t, what), _metric(base, what)
    return "-" if a is None or not b else f"{a / b:.2f}x"


def _diff(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a - b:+.2f}"


def figure(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Each metric of each scenario divided by loopback's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = results["loopback"]
    metrics = [("accuracy", "accuracy"), ("median", "e2e median"), ("p95", "e2e p95"), ("bytes", "bytes/inference")]
    names = [n for n in results if n != "loopback"]
    fig, ax = plt.subplots(figsize=(10, 3.6))
    width = 0.8 / len(metrics)
    for i, (key, label) in enumerate(metrics):
        values = [(_metric(results[n], key) or 0) / (_metric(base, key) or 1) for n in names]
        ax.bar([x + i * width for x in range(len(names))], values, width, label=label)
    ax.set_yscale("log")
    ax.axhline(1, color="black", linewidth=0.8)
    ax.set_xticks([x + width * (len(metrics) - 1) / 2 for x in range(len(names))], names, fontsize=8)
    ax.set_ylabel("x loopback")
    ax.set_title("quick fleet under emulated links, each metric against loopback")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
