"""Accuracy benchmark: every method x setting on Fashion-MNIST, written to docs/results/accuracy.md.

    .venv/bin/python -m bench.accuracy [--runs runs/bench] [--out docs/results/accuracy.md] [--set KEY=VALUE ...]

Runs are resumable (each goes through `nmoe train` into RUNS/<setting>); rerunning only
recomputes what did not finish. --set overrides are applied to every setting (e.g. a smaller
number of rounds for a smoke test; the report records them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"Dirichlet 0.1": "fmnist-dir0.1", "Dirichlet 0.5": "fmnist-dir0.5", "IID": "fmnist-iid"}
DENSE = ("local", "fedavg", "fedavg_ft")


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def mb(x: int) -> str:
    return f"{x / 1e6:.2f}"


def run_setting(config: str, run_dir: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "toolkit.cli", "train", str(ROOT / "configs" / f"{config}.toml"),
           "--out", str(run_dir)] + [a for o in overrides for a in ("--set", o)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads((run_dir / "metrics.json").read_text())


def best(methods: dict, names: list[str], key: str = "personalized_accuracy") -> tuple[str, float] | None:
    present = [n for n in names if n in methods]
    if not present:
        return None
    name = max(present, key=lambda n: methods[n][key])
    return name, methods[name][key]


def targets(methods: dict) -> list[str]:
    """The issue's targets for one setting, each with its measured numbers and a verdict."""
    fedgates = [n for n in methods if n.endswith("_fedgate")]
    top = best(methods, fedgates)
    dense = best(methods, list(DENSE))
    if not top or not dense:
        return ["(targets need nmoe_*_fedgate and the dense baselines in the run)"]
    name, p = top
    lines = [f"- best FedGate variant: `{name}`"]
    ok = p >= dense[1]
    lines.append(f"- personalized: {pct(p)} vs best dense `{dense[0]}` {pct(dense[1])} "
                 f"({'+' if p >= dense[1] else ''}{100 * (p - dense[1]):.2f} pts): **{'met' if ok else 'missed'}**")
    if "fedavg" in methods:
        g, gf = methods[name]["global_accuracy"], methods["fedavg"]["global_accuracy"]
        ok = g >= gf - 0.02
        lines.append(f"- global: {pct(g)} vs fedavg {pct(gf)} ({100 * (g - gf):+.2f} pts, target >= -2.00): "
                     f"**{'met' if ok else 'missed'}**")
    partner = name.replace("_fedgate", "_fedavggate")
    if partner in methods:
        q = methods[partner]["personalized_accuracy"]
        lines.append(f"- fedgate vs fedavggate (same stage 1): {pct(p)} vs {pct(q)} "
                     f"({100 * (p - q):+.2f} pts): **{'met' if p >= q else 'missed'}**")
    for s1 in ("fedce", "fedsc", "hybrid"):
        a, b = methods.get(f"nmoe_{s1}_fedgate"), methods.get(f"nmoe_{s1}_fedavggate")
        if a and b:
            lines.append(f"  - {s1}: fedgate {pct(a['personalized_accuracy'])} vs fedavggate "
                         f"{pct(b['personalized_accuracy'])}")
    return lines


def setting_section(title: str, config: str, metrics: dict) -> list[str]:
    methods = metrics["methods"]
    lines = [f"## {title} (`configs/{config}.toml`)", "",
             (f"Resumed from checkpoints: this invocation took {metrics['elapsed_seconds']:.0f} s; the training "
              "ran in earlier invocations (run.log of the run dir says when)." if metrics.get("resumed")
              else f"Run time {metrics['elapsed_seconds']:.0f} s."), "",
             "| method | personalized acc % | global acc % | upload MB | download MB |",
             "|---|---:|---:|---:|---:|"]
    order = [n for n in ("local", "fedavg", "fedavg_ft", "centralized") if n in methods]
    order += sorted(n for n in methods if n.startswith("nmoe_"))
    for n in order:
        m = methods[n]
        lines.append(f"| {n} | {pct(m['personalized_accuracy'])} | {pct(m['global_accuracy'])} | "
                     f"{mb(m['upload_bytes'])} | {mb(m['download_bytes'])} |")
    lines += ["", "Targets:", *targets(methods), ""]
    return lines


def compute_section(metrics: dict) -> list[str]:
    per = metrics["compute"]["per_device"]
    lines = ["## Compute and memory per device", "",
             "| deployment | MACs per sample | parameters | fp32 parameter memory KB | what it holds |",
             "|---|---:|---:|---:|---|"]
    for name, row in per.items():
        lines.append(f"| {name} | {row['macs']:,} | {row['params']:,} | {row['params'] * 4 / 1000:.1f} | {row['note']} |")
    return lines + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs/bench", help="where the run dirs go (default runs/bench)")
    ap.add_argument("--out", default="docs/results/accuracy.md", help="the report to write")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every setting")
    ap.add_argument("--only", action="append", choices=list(SETTINGS.values()), help="run only these settings")
    args = ap.parse_args()
    start = time.time()
    results = {}
    for title, config in SETTINGS.items():
        if args.only and config not in args.only:
            continue
        results[title] = (config, run_setting(config, ROOT / args.runs / config, args.set))
    any_metrics = next(iter(results.values()))[1]
    machine = any_metrics["machine"]
    cmd = "make bench-accuracy" if not (args.set or args.only) else "python -m bench.accuracy " + " ".join(
        [f"--set {s}" for s in args.set] + [f"--only {o}" for o in args.only or []])
    lines = ["# Accuracy benchmark", "",
             f"Command: `{cmd}` (wrote this file in {time.time() - start:.0f} s of wall time).", "",
             (f"Machine: {machine['processor']}, {machine['cpus']} cores, {machine['platform']}, "
             f"Python {machine['python']}, torch {machine['torch']}."), "",
             ("Fashion-MNIST (60k train / 10k test, Debian `dataset-fashion-mnist`), 10 clients. "
             "Personalized accuracy: mean over clients of the accuracy on a test split drawn with the "
             "client's own label mix (1000 samples each); global accuracy: mean over clients of the "
             "accuracy of the model that client uses on the full balanced test set. Bytes: every tensor "
             "exchanged over all rounds and clients (NMoE includes its Stage 1)."), ""]
    for title, (config, metrics) in results.items():
        lines += setting_section(title, config, metrics)
    lines += compute_section(any_metrics)
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
