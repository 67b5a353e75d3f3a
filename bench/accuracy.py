"""Accuracy benchmark: every method x setting on Fashion-MNIST, written to a report in docs/results/.

    .venv/bin/python -m bench.accuracy [--suite accuracy|gates] [--runs DIR] [--out FILE] [--set KEY=VALUE ...]

Suites: `accuracy` (configs/fmnist-{dir0.1,dir0.5,iid}.toml -> docs/results/accuracy.md) and `gates`
(the -gates configs: the classic gates and toolkit.gates' methods over FedCE -> docs/results/gates.md).
Runs are resumable (each goes through `nmoe train` into RUNS/<setting>); rerunning only
recomputes what did not finish. --set overrides are applied to every setting (e.g. a smaller
number of rounds for a smoke test; the report records them). Every setting gets a table, the
routing ceilings of its experts, the issue's targets with verdicts and a scatter plot of
personalized vs global accuracy (one point per method) next to the report. The machine's load
average is recorded before and after. Whatever follows the line NOTES in an existing report
(hand-written analysis) is kept when the report is rewritten.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D

from bench.common import verdict

ROOT = Path(__file__).resolve().parent.parent
SUITES = {  # suite -> ({setting: config}, default report)
    "accuracy": ({"Dirichlet 0.1": "fmnist-dir0.1", "Dirichlet 0.5": "fmnist-dir0.5", "IID": "fmnist-iid"},
                 "docs/results/accuracy.md"),
    "gates": ({"Dirichlet 0.1": "fmnist-dir0.1-gates", "Dirichlet 0.5": "fmnist-dir0.5-gates",
               "IID": "fmnist-iid-gates"}, "docs/results/gates.md"),
}
NOTES = "## Notes"  # from this line on, a report's text is hand-written and kept
DENSE = ("local", "fedavg", "fedavg_ft")
BASELINES = (*DENSE, "centralized")
NEW_FEDGATES = ("fedgate_ood", "fedgate_vl", "fedgate_heldout", "fedgate_switch")  # toolkit.gates' FedGate-family methods
LOCAL_VARIANT = {"fedgate_vl": "localgate_vl", "fedgate": "localgate"}  # same method, nothing averaged
IID_MARGIN = 0.005


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def pts(x: float) -> str:
    return f"{100 * x:+.2f} pts"


def mb(x: int) -> str:
    return f"{x / 1e6:.2f}"


def run_setting(config: str, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "toolkit.cli", "train", str(ROOT / "configs" / f"{config}.toml"),
           "--out", str(run_dir)] + [a for o in overrides for a in ("--set", o)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    metrics: dict[str, Any] = json.loads((run_dir / "metrics.json").read_text())
    return metrics


def gate_of(name: str) -> str:
    """'fedgate_vl' for 'nmoe_fedce_fedgate_vl'; '' for a baseline."""
    parts = name.split("_", 2)
    return parts[2] if name.startswith("nmoe_") and len(parts) == 3 else ""


def balance(m: dict[str, Any]) -> float:
    """What 'best' means for a method that must do both: the mean of personalized and global accuracy."""
    both: float = (m["personalized_accuracy"] + m["global_accuracy"]) / 2
    return both


def local_variant(name: str) -> str:
    """The same method with nothing averaged ('' when it has none)."""
    local = LOCAL_VARIANT.get(gate_of(name))
    return f"nmoe_{name.split('_', 2)[1]}_{local}" if local else ""


def best_new_fedgate(methods: dict[str, Any]) -> str | None:
    pool = [n for n in methods if gate_of(n) in NEW_FEDGATES]
    return max(pool, key=lambda n: balance(methods[n])) if pool else None


def targets(methods: dict[str, Any], iid: bool) -> list[str]:
    """The issue's targets for one setting, each with its measured numbers and a verdict."""
    name = best_new_fedgate(methods)
    dense = [n for n in DENSE if n in methods]
    if not name or not dense:
        return ["(targets need a new FedGate-family method and the dense baselines in the run)"]
    m = methods[name]
    p, g = m["personalized_accuracy"], m["global_accuracy"]
    stage1 = name.split("_", 2)[1]
    lines = [f"- best new FedGate-family method (highest mean of personalized and global): `{name}`"]
    if iid:
        partner = f"nmoe_{stage1}_fedavggate"
        if partner in methods:
            q = methods[partner]
            for kind in ("personalized", "global"):
                a, b = m[f"{kind}_accuracy"], q[f"{kind}_accuracy"]
                lines.append(f"- {kind} vs `{partner}`: {pct(a)} vs {pct(b)} ({pts(a - b)}, target >= -0.50 pts): "
                             f"{verdict(a >= b - IID_MARGIN)}")
        return lines
    top = max(dense, key=lambda n: methods[n]["personalized_accuracy"])
    d = methods[top]["personalized_accuracy"]
    lines.append(f"- personalized: {pct(p)} vs best dense `{top}` {pct(d)} ({pts(p - d)}): {verdict(p >= d)}")
    if "fedavg" in methods:
        f = methods["fedavg"]["global_accuracy"]
        lines.append(f"- global: {pct(g)} vs fedavg {pct(f)} ({pts(g - f)}): {verdict(g >= f)}")
    with_local = [n for n in methods if gate_of(n) in NEW_FEDGATES and local_variant(n) in methods]
    if with_local:
        own = name if name in with_local else max(with_local, key=lambda n: balance(methods[n]))
        og, local = methods[own]["global_accuracy"], local_variant(own)
        lg = methods[local]["global_accuracy"]
        lines.append(f"- averaged gate body helps: global of `{own}` {pct(og)} vs its local-only variant `{local}` "
                     f"{pct(lg)} ({pts(og - lg)}): {verdict(og > lg)}" +
                     ("" if own == name else f" (`{name}` has no local-only variant)"))
    else:
        lines.append(f"- averaged gate body helps: `{name}` has no local-only variant in this run")
    return lines


def ceiling_lines(methods: dict[str, Any]) -> list[str]:
    """Per Stage 1 method: how far perfect routing would go with these experts."""
    lines = ["Routing ceilings of the experts (label-aware, so not methods; see `toolkit/gates/ceiling.py`):", "",
             "| stage 1 | oracle routing pers. / global % | best expert per class pers. / global % |",
             "|---|---:|---:|"]
    seen = set()
    for n in sorted(methods):
        ceiling = methods[n].get("ceiling")
        stage1 = n.split("_")[1] if n.startswith("nmoe_") else ""
        if ceiling and stage1 not in seen:
            seen.add(stage1)
            o, b = ceiling["oracle_routing"], ceiling["best_expert_per_class"]
            lines.append(f"| {stage1} | {pct(o['personalized_accuracy'])} / {pct(o['global_accuracy'])} | "
                         f"{pct(b['personalized_accuracy'])} / {pct(b['global_accuracy'])} |")
    return lines + [""] if seen else []


def scatter(title: str, methods: dict[str, Any], path: Path) -> None:
    """Personalized vs global accuracy, one point per method; the upper right corner is the goal."""
    fig, ax = plt.subplots(figsize=(8.5, 6.5))
    for name, m in methods.items():
        x, y = 100 * m["personalized_accuracy"], 100 * m["global_accuracy"]
        gate = gate_of(name)
        style: dict[str, Any]
        if name in BASELINES:
            style = {"marker": "s", "color": "0.35", "s": 45}
        elif gate in NEW_FEDGATES or gate == "localgate_vl":
            style = {"marker": "*", "color": "tab:red", "s": 110}
        else:
            style = {"marker": "o", "color": "tab:blue", "s": 35}
        ax.scatter(x, y, zorder=3, **style)
        ax.annotate(name.removeprefix("nmoe_"), (x, y), fontsize=6.5, xytext=(3, 3), textcoords="offset points")
    ax.set(title=f"{title}: personalized vs global accuracy (upper right is the goal)",
           xlabel="personalized accuracy %", ylabel="global accuracy %")
    ax.grid(alpha=0.3)
    handles = [Line2D([], [], marker=mk, color=c, linestyle="", label=lab) for mk, c, lab in
               (("s", "0.35", "dense baseline"), ("o", "tab:blue", "NMoE, classic gate"),
                ("*", "tab:red", "NMoE, toolkit.gates"))]
    ax.legend(handles=handles, loc="lower left", fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def setting_section(title: str, config: str, metrics: dict[str, Any], plot: Path) -> list[str]:
    methods = metrics["methods"]
    lines = [f"## {title} (`configs/{config}.toml`)", "",
             (f"Resumed from checkpoints: this invocation took {metrics['elapsed_seconds']:.0f} s; the training "
              "ran in earlier invocations (run.log of the run dir says when)." if metrics.get("resumed")
              else f"Run time {metrics['elapsed_seconds']:.0f} s."), "",
             "| method | personalized acc % | global acc % | upload MB | download MB |",
             "|---|---:|---:|---:|---:|"]
    order = [n for n in BASELINES if n in methods] + sorted(n for n in methods if n.startswith("nmoe_"))
    for n in order:
        m = methods[n]
        lines.append(f"| {n} | {pct(m['personalized_accuracy'])} | {pct(m['global_accuracy'])} | "
                     f"{mb(m['upload_bytes'])} | {mb(m['download_bytes'])} |")
    lines += ["", *ceiling_lines(methods), "Targets:", *targets(methods, iid=title == "IID"), "",
              f"![personalized vs global accuracy, {title}]({plot.name})", ""]
    return lines


def compute_section(metrics: dict[str, Any]) -> list[str]:
    per = metrics["compute"]["per_device"]
    lines = ["## Compute and memory per device", "",
             "| deployment | MACs per sample | parameters | fp32 parameter memory KB | what it holds |",
             "|---|---:|---:|---:|---|"]
    for name, row in per.items():
        lines.append(f"| {name} | {row['macs']:,} | {row['params']:,} | {row['params'] * 4 / 1000:.1f} | {row['note']} |")
    return lines + [""]


def kept_notes(out: Path) -> list[str]:
    """The hand-written part of an existing report (from the NOTES line on), or nothing."""
    if not out.exists():
        return []
    lines = out.read_text().splitlines()
    return lines[lines.index(NOTES):] if NOTES in lines else []


def load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=list(SUITES), default="accuracy", help="which configs (default accuracy)")
    ap.add_argument("--runs", default="runs/bench", help="where the run dirs go (default runs/bench)")
    ap.add_argument("--out", help="the report to write (default: the suite's, in docs/results/)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every setting")
    ap.add_argument("--only", action="append", help="run only these settings (config names)")
    args = ap.parse_args()
    settings, default_out = SUITES[args.suite]
    unknown = sorted(set(args.only or []) - set(settings.values()))
    if unknown:
        ap.error(f"--only {unknown[0]}: not a config of suite {args.suite} ({', '.join(settings.values())})")
    start, load_before = time.time(), load()
    results = {}
    for title, config in settings.items():
        if args.only and config not in args.only:
            continue
        results[title] = (config, run_setting(config, ROOT / args.runs / config, args.set))
    any_metrics = next(iter(results.values()))[1]
    machine = any_metrics["machine"]
    cmd = "python -m bench.accuracy " + " ".join([f"--suite {args.suite}", f"--runs {args.runs}"] +
                                                  [f"--set '{s}'" for s in args.set] +
                                                  [f"--only {o}" for o in args.only or []])
    title = "Accuracy benchmark" if args.suite == "accuracy" else "Gate benchmark (issue 13)"
    lines = [f"# {title}", "",
             f"Command: `{cmd}` (wrote this file in {time.time() - start:.0f} s of wall time).", "",
             (f"Machine: {machine['processor']}, {machine['cpus']} cores, {machine['platform']}, "
             f"Python {machine['python']}, torch {machine['torch']}. Load average (1 / 5 / 15 min) "
             f"before: {load_before}, after: {load()} (the machine is shared)."), "",
             ("Fashion-MNIST (60k train / 10k test, Debian `dataset-fashion-mnist`), 10 clients. "
             "Personalized accuracy: mean over clients of the accuracy on a test split drawn with the "
             "client's own label mix (1000 samples each); global accuracy: mean over clients of the "
             "accuracy of the model that client uses on the full balanced test set. Bytes: every tensor "
             "exchanged over all rounds and clients (NMoE includes its Stage 1)."), ""]
    out = ROOT / (args.out or default_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    notes = kept_notes(out)
    for title, (config, metrics) in results.items():
        plot = out.parent / f"{out.stem}-{config}.png"
        scatter(title, metrics["methods"], plot)
        lines += setting_section(title, config, metrics, plot)
    lines += compute_section(any_metrics) + notes
    out.write_text("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
