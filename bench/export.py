"""Export benchmark: size, accuracy and latency per format and precision, written to docs/results/export.md.

    .venv/bin/python -m bench.export [--run runs/bench/export-dir0.5] [--out docs/results/export.md]
                                  [--set KEY=VALUE ...] [--no-arm64]

Trains (resumable) the benchmark NMoE on Fashion-MNIST Dirichlet(0.5), 10 clients, FedCE + FedGate
only (configs/fmnist-dir0.5.toml), exports every client's bundle in every format and precision with
`nmoe export --check-arm64`, and turns BUNDLES/report.json and arm64.json into one page with the
issue's targets and verdicts. Run it with nothing else on the machine: latency is wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.common import verdict

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "fmnist-dir0.5"
ONLY_FEDGATE = ['stage1.methods=["fedce"]', 'gate.methods=["fedgate"]', "baselines.methods=[]"]
FORMATS = ("onnx", "executorch", "tflite")
ROLES = ("extractor", "gate", "expert")
RUNTIME = {"onnx": "ONNX Runtime", "executorch": "ExecuTorch (XNNPACK)", "tflite": "LiteRT"}


def nmoe(*args: str) -> int:
    cmd = [sys.executable, "-m", "toolkit.cli", *args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, check=False).returncode


def mean(values: list[float]) -> float:
    return statistics.fmean(values)


def variant_rows(report: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per format x precision: mean size, accuracies, worst drop, latencies (means over devices)."""
    nmoe_rows, model_rows = defaultdict(list), defaultdict(list)
    for r in report["nmoe"]:
        nmoe_rows[(r["format"], r["precision"])].append(r)
    for m in report["models"]:
        model_rows[(m["format"], m["precision"], m["role"])].append(m)
    out = {}
    for (fmt, precision), rows in nmoe_rows.items():
        out[(fmt, precision)] = {
            "bytes": mean([r["model_bytes"] for r in rows]),
            "torch": mean([r["torch_accuracy"] for r in rows]),
            "accuracy": mean([r["accuracy"] for r in rows]),
            "worst_drop": max(r["drop"] for r in rows),
            "worst_device": max(rows, key=lambda r: r["drop"])["device"],
            "nmoe_us": mean([r["latency_us_median"] for r in rows]),
            "nmoe_p99": mean([r["latency_us_p99"] for r in rows]),
            "role_us": {role: mean([m["latency_us_median"] for m in model_rows[(fmt, precision, role)]])
                        for role in ("extractor", "gate", "expert")},
            "relative_diff": max(m["max_abs_diff"] / m["reference_max_abs"] for role in ("extractor", "gate", "expert")
                                 for m in model_rows[(fmt, precision, role)]),
        }
    return out


def variants_table(rows: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    lines = [("| format | precision | MB per device | torch fp32 acc % | bundle acc % | worst drop (device) | "
             "NMoE p50 us | NMoE p99 us | extractor p50 us | gate p50 us | expert p50 us | max abs diff / max abs torch |"),
             "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for (fmt, precision), r in sorted(rows.items(), key=lambda kv: (FORMATS.index(kv[0][0]), kv[0][1])):
        lines.append(f"| {fmt} | {precision} | {r['bytes'] / 1e6:.3f} | {r['torch']:.2f} | {r['accuracy']:.2f} | "
                     f"{r['worst_drop']:+.2f} ({r['worst_device']}) | {r['nmoe_us']:.0f} | {r['nmoe_p99']:.0f} | "
                     f"{r['role_us']['extractor']:.1f} | {r['role_us']['gate']:.1f} | {r['role_us']['expert']:.1f} | "
                     f"{r['relative_diff']:.2e} |")
    return lines


def targets(rows: dict[tuple[str, str], dict[str, Any]], arm64: dict[str, Any] | None) -> list[str]:
    lines = []
    for fmt in FORMATS:
        fp32, int8 = rows.get((fmt, "fp32")), rows.get((fmt, "int8"))
        if not (fp32 and int8):
            continue
        ratio = int8["bytes"] / fp32["bytes"]
        lines += [f"- {RUNTIME[fmt]}:",
                  f"  - int8 size {100 * ratio:.1f}% of fp32 (target <= 30%): {verdict(ratio <= 0.30)}",
                  (f"  - int8 worst per-client accuracy drop vs torch fp32 {int8['worst_drop']:+.2f} points on "
                  f"{int8['worst_device']} (target <= 0.5): {verdict(int8['worst_drop'] <= 0.5)}"),
                  "  - int8 batch-1 latency of each model in this runtime vs fp32 (target int8 <= fp32): "
                  + ", ".join(f"{role} {int8['role_us'][role]:.1f}/{fp32['role_us'][role]:.1f} us"
                              for role in ROLES)
                  + f": {verdict(all(int8['role_us'][r] <= fp32['role_us'][r] for r in ROLES))}; whole NMoE in "
                  f"Python (info, dominated by the glue shared by both): int8 {int8['nmoe_us']:.0f} us, fp32 "
                  f"{fp32['nmoe_us']:.0f} us"]
    if arm64 is not None:
        checks = arm64["checks"]
        fp32_checks = [c for c in checks if c["precision"] == "fp32"]
        int8_checks = [c for c in checks if c["precision"] == "int8"]
        worst = max((c["max_abs_diff"] for c in fp32_checks), default=float("nan"))
        top1 = min((c["top1_agreement"] for c in int8_checks), default=float("nan"))
        lines += [(f"- ARM64 (qemu-user {', '.join(arm64['cpus'])}; {', '.join(arm64['formats'])}): fp32 max abs diff "
                  f"vs x86 {worst:.2e} over {len(fp32_checks)} outputs (target < 1e-4): {verdict(worst < 1e-4)}; int8 top-1 "
                  f"agreement min {100 * top1:.1f}% over {len(int8_checks)} outputs (target identical): "
                  f"{verdict(top1 == 1.0)}")]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/bench/export-dir0.5", help="run dir (trained here when unfinished)")
    ap.add_argument("--bundles", default="runs/bench/export-dir0.5-bundles", help="where the bundles go")
    ap.add_argument("--out", default="docs/results/export.md", help="the report to write")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training override")
    ap.add_argument("--no-arm64", action="store_true", help="skip the emulated ARM64 check")
    args = ap.parse_args()
    start, load_start = time.time(), os.getloadavg()
    run, bundles = ROOT / args.run, ROOT / args.bundles
    overrides = [a for o in [*ONLY_FEDGATE, *args.set] for a in ("--set", o)]
    if nmoe("train", str(ROOT / "configs" / f"{CONFIG}.toml"), "--out", str(run), *overrides) != 0:
        return 1
    trained = time.time()
    code = nmoe("export", str(run), "--out", str(bundles), "--formats", ",".join(FORMATS),
                "--precision", "fp32,int8", "--max-accuracy-drop", "100",
                *([] if args.no_arm64 else ["--check-arm64"]))
    if code not in (0, 1):
        return code
    report = json.loads((bundles / "report.json").read_text())
    arm64 = None if args.no_arm64 else json.loads((bundles / "arm64.json").read_text())
    rows = variant_rows(report)
    m, s = report["machine"], report["settings"]
    cmd = "make bench-export" if not (args.set or args.no_arm64) else "python bench/export " + " ".join(
        [f"--set {o}" for o in args.set] + (["--no-arm64"] if args.no_arm64 else []))
    lines = [
        "# Export benchmark", "",
        (f"Command: `{cmd}` (training {trained - start:.0f} s, export + parity + ARM64 check "
        f"{time.time() - trained:.0f} s of wall time)."), "",
        f"Machine: {m['processor']}, {m['cpus']} cores, {m['platform']}, Python {m['python']}; runtimes: "
        + ", ".join(f"{k} {v}" for k, v in m.items() if k in ("onnxruntime", "executorch", "ai-edge-litert")) + ".", "",
        (f"Load average (1/5/15 min): {' / '.join(f'{x:.2f}' for x in load_start)} at start, "
        f"{' / '.join(f'{x:.2f}' for x in os.getloadavg())} at the end (2 cores: above ~1 other jobs were running "
        "and latencies are noisier)."), "",
        (f"Model: `{report['method']}` of `configs/{CONFIG}.toml` (Fashion-MNIST, 10 clients, Dirichlet 0.5; only FedCE "
        "and FedGate trained). Every device's bundle: shared extractor, its gate, its own expert. int8: static, "
        "calibrated on each client's own training images. Accuracy: each client's NMoE (its extractor and gate, "
        "every expert in-process through the agent's runtime layer) on its personalized test set (1000 images), "
        f"mean over the 10 clients. Latency: batch 1, {s['intra_op_threads']} thread, median of "
        f"{s['latency_runs']} runs after {s['latency_warmup']} warm-up, mean over devices; NMoE = preprocess, "
        "extractor, gate, top-2 experts, combine."), "",
        *variants_table(rows), "",
        "## Targets", "", *targets(rows, arm64), "",
        f"Per-device tables: `{args.bundles}/report.md`"
        + ("" if args.no_arm64 else f" and `{args.bundles}/arm64.md`") + " after running the command.", ""]
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
