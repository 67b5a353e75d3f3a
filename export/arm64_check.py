"""ARM64 parity of device bundles: the same self-check natively and under emulated aarch64, compared.

`device_agent.selfcheck --save` runs every ONNX and LiteRT model of the bundles on their samples with
this interpreter (x86), then with Debian's aarch64 python3.11 under qemu-user (`QEMU_CPU` per CPU,
e.g. cortex-a72 = Raspberry Pi 4, cortex-a76 = Pi 5) from the cache scripts/arm64_env.sh builds.
Every output is compared with the x86 one: fp32 must agree to FP32_TOLERANCE, int8 must pick the
same top-1 on every row (argmax over the last axis, every role; the max abs diff is reported too).
Emulation checks numerics, not speed (~300x slower than a real board).

    python -m export.arm64_check BUNDLES [--cpus cortex-a72,cortex-a76] [--formats onnx,tflite]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

if __name__ == "__main__":  # before the imports below need them: name the missing extras in one line
    from toolkit.extras import exit_unless_installed

    exit_unless_installed("python -m export.arm64_check", ("torch", "matplotlib", "onnxruntime", "ai_edge_litert"))

from device_agent.bundle import BundleError, load_bundle
from device_agent.selfcheck import top1_agreement
from export.bundle_writer import ExportError
from toolkit.arm64_env import ROOT, Arm64EnvError, emulated_command, ensure_env, qemu_version
from toolkit.rundir import machine, write_json

FP32_TOLERANCE = 1e-4
CPUS = ("cortex-a72", "cortex-a76")
FORMATS = ("onnx", "tflite")
NOT_EMULATED = {"executorch": "never run under emulation: ExecuTorch's aarch64 Python bindings need torch "
                              "(PyPI's aarch64 torch wheels are CUDA builds); on a device its C++ runtime is torch-free"}


class Arm64Error(ExportError):
    """The check cannot run (no emulator or cache, a self-check that crashed); one line for `nmoe export`."""


@dataclass(frozen=True)
class Arm64Check:
    """One model output under one emulated CPU vs x86."""

    cpu: str
    device: str
    role: str
    format: str
    precision: str
    rows: int
    max_abs_diff: float
    top1_agreement: float  # fraction of rows with the same argmax over the last axis
    passed: bool


@dataclass(frozen=True)
class SelfcheckRun:
    """One self-check process (natively or under one emulated CPU): what it ran on and how long it took."""

    cpu: str  # "native" for x86
    machine: str
    python: str
    numpy: str
    seconds: float


@dataclass(frozen=True)
class Arm64Report:
    """Everything `arm64.json` holds."""

    bundles_dir: str
    cpus: list[str]
    formats: list[str]  # compared
    skipped: list[str]  # formats not run, and why
    fp32_tolerance: float
    machine: dict[str, Any]  # the x86 host, incl. the qemu version
    runs: list[SelfcheckRun]  # native first, then one per CPU
    checks: list[Arm64Check]
    failures: list[str]


def run_selfcheck(python: list[str], env: dict[str, str], bundles: Sequence[Path], formats: Sequence[str],
                  save: Path, cpu: str) -> SelfcheckRun:
    """`python -m device_agent.selfcheck --save` on the bundles; its exit 1 (an fp32 model off vs torch) still
    yields outputs to compare, anything else raises."""
    cmd = [*python, "-m", "device_agent.selfcheck", *map(str, bundles), "--formats", ",".join(formats),
           "--save", str(save), "--json"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    try:
        info = json.loads(proc.stdout) if proc.returncode in (0, 1) else None
    except json.JSONDecodeError:
        info = None
    if info is None:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise Arm64Error(f"self-check on {cpu} exited {proc.returncode}: {tail}")
    return SelfcheckRun(cpu, info["machine"], info["python"], info["numpy"], round(seconds, 2))


def compare(native: Mapping[str, np.ndarray], emulated: Mapping[str, np.ndarray], cpu: str
            ) -> tuple[list[Arm64Check], list[str]]:
    """Every saved output `<device>/<role>/<format>/<precision>` under `cpu` vs x86: checks and failures."""
    checks, failures = [], []
    for key in [*native, *(k for k in emulated if k not in native)]:
        where = f"{cpu} {key.replace('/', ' ')}"
        if key not in native or key not in emulated:
            failures.append(f"{where}: output only {'natively' if key in native else 'under emulation'}")
            continue
        a, b = native[key], emulated[key]
        if a.shape != b.shape:
            failures.append(f"{where}: shape {list(b.shape)} under emulation, {list(a.shape)} natively")
            continue
        device, role, fmt, precision = key.split("/")
        diff, top1 = float(np.abs(a - b).max()), top1_agreement(a, b)
        passed = diff < FP32_TOLERANCE if precision == "fp32" else top1 == 1.0  # NaN fails
        checks.append(Arm64Check(cpu, device, role, fmt, precision, len(a), diff, top1, passed))
        if not passed:
            failures.append(f"{where}: max abs diff {diff:.2e}, top-1 agreement {100 * top1:.1f}% vs x86 (needs "
                            + (f"diff < {FP32_TOLERANCE:g})" if precision == "fp32" else "100% top-1)"))
    return checks, failures


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _plan(bundles: Sequence[Path], formats: Sequence[str]) -> tuple[list[str], list[str]]:
    """Formats to run, and a note on each format of the bundles not run and each requested one they lack."""
    try:
        present = list(dict.fromkeys(e.format for b in map(load_bundle, bundles) for e in b.manifest.models))
    except BundleError as e:
        raise Arm64Error(str(e)) from None
    run = [f for f in formats if f in present and f not in NOT_EMULATED]
    skipped = [f"{f}: {NOT_EMULATED.get(f, 'not requested')}" for f in present if f not in run]
    return run, skipped + [f"{f}: not in these bundles" for f in formats if f not in present]


def check_arm64(bundles_dir: Path, cpus: Sequence[str] = CPUS, formats: Sequence[str] = FORMATS) -> Arm64Report:
    """Run the bundles' models natively and under each emulated CPU and compare every output."""
    bundles = sorted(p for p in Path(bundles_dir).glob("device-*") if p.is_dir())
    if not bundles:
        raise Arm64Error(f"{bundles_dir}: no device-* bundles")
    run, skipped = _plan(bundles, formats)
    if not run:
        return Arm64Report(str(bundles_dir), list(cpus), [], skipped, FP32_TOLERANCE, {**machine(), "qemu": None},
                           [], [], [f"{bundles_dir}: no model in a format run under emulation ({', '.join(FORMATS)})"])
    try:
        cache, host = ensure_env(), {**machine(), "qemu": qemu_version()}
    except Arm64EnvError as e:
        raise Arm64Error(str(e)) from None
    checks, failures = [], []
    with tempfile.TemporaryDirectory(prefix="arm64-") as tmp:
        native_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.getenv("PYTHONPATH")]))}
        runs = [run_selfcheck([sys.executable], native_env, bundles, run, Path(tmp) / "native.npz", "native")]
        native = _load(Path(tmp) / "native.npz")
        for cpu in cpus:
            print(f"arm64: {len(native)} outputs, {cpu} under qemu ...", file=sys.stderr)
            runs.append(run_selfcheck(*emulated_command(cache, cpu), bundles, run, Path(tmp) / f"{cpu}.npz", cpu))
            cpu_checks, cpu_failures = compare(native, _load(Path(tmp) / f"{cpu}.npz"), cpu)
            checks += cpu_checks
            failures += cpu_failures
    return Arm64Report(str(bundles_dir), list(cpus), run, skipped, FP32_TOLERANCE, host, runs, checks, failures)


def summary_table(report: Arm64Report) -> str:
    """Markdown table, one row per CPU x format x precision: the worst output of each."""
    groups: dict[tuple[str, str, str], list[Arm64Check]] = {}
    for c in report.checks:
        groups.setdefault((c.cpu, c.format, c.precision), []).append(c)
    rows = ["| cpu | format | precision | outputs | worst max abs diff | lowest top-1 agreement | result |",
            "|---|---|---|---:|---:|---:|---|"]
    rows += [f"| {cpu} | {fmt} | {precision} | {len(cs)} | {np.max([c.max_abs_diff for c in cs]):.2e} | "
             f"{100 * min(c.top1_agreement for c in cs):.1f}% | "
             f"{'pass' if all(c.passed for c in cs) else '**FAIL**'} |" for (cpu, fmt, precision), cs in groups.items()]
    return "\n".join(rows)


def checks_table(report: Arm64Report) -> str:
    """Markdown table, one row per CPU x device x role x format x precision."""
    rows = ["| cpu | device | role | format | precision | max abs diff | top-1 agreement | result |",
            "|---|---|---|---|---|---:|---:|---|"]
    rows += [f"| {c.cpu} | {c.device} | {c.role} | {c.format} | {c.precision} | {c.max_abs_diff:.2e} | "
             f"{100 * c.top1_agreement:.1f}% of {c.rows} | {'pass' if c.passed else '**FAIL**'} |" for c in report.checks]
    return "\n".join(rows)


def write_arm64_report(report: Arm64Report, out_dir: Path) -> None:
    """`out_dir/arm64.json` (every number) and `out_dir/arm64.md` (tables)."""
    write_json(Path(out_dir) / "arm64.json", asdict(report))
    m = report.machine
    runs = "\n".join(f"| {r.cpu} | {r.machine} | {r.python} | {r.numpy} | {r.seconds:.1f} |" for r in report.runs)
    notes = "\n".join(f"- {s}" for s in report.skipped) or "none"
    failures = "\n".join(f"- {f}" for f in report.failures) or "none"
    (Path(out_dir) / "arm64.md").write_text(
        f"# ARM64 parity under emulation\n\nBundles: `{report.bundles_dir}`. Host: {m['processor']}, {m['cpus']} CPUs, "
        f"{m['platform']}. Emulator: {m['qemu']}.\n\nEach output of the self-check (`python -m "
        f"device_agent.selfcheck`, samples.npz) under emulated aarch64 vs the same on the host: fp32 must differ "
        f"by less than {report.fp32_tolerance:g}; int8 must give the same argmax (last axis) on every row.\n\n"
        f"| run | machine | python | numpy | seconds |\n|---|---|---|---|---:|\n{runs}\n\n"
        f"## Outputs vs x86 ({', '.join(report.formats) or 'none'})\n\n{summary_table(report)}\n\n"
        f"Every output:\n\n{checks_table(report)}\n\n"
        f"## Not run\n\n{notes}\n\n## Failures\n\n{failures}\n")


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: check, write BUNDLES/arm64.json and arm64.md; exit 1 when a check fails, 2 when it cannot run."""
    p = argparse.ArgumentParser(prog="python -m export.arm64_check", description=__doc__.split("\n\n")[0])
    p.add_argument("bundles", type=Path, metavar="BUNDLES", help="folder of device-<c>/ bundles (`nmoe export --out`)")
    p.add_argument("--cpus", type=_names, default=list(CPUS), metavar="LIST",
                   help=f"comma-separated QEMU_CPU models (default: {','.join(CPUS)})")
    p.add_argument("--formats", type=_names, default=list(FORMATS), metavar="LIST",
                   help=f"comma-separated formats (default: {','.join(FORMATS)}; executorch is never emulated)")
    args = p.parse_args(argv)
    try:
        report = check_arm64(args.bundles, args.cpus, args.formats)
    except Arm64Error as e:
        print(f"arm64_check: error: {e}", file=sys.stderr)
        return 2
    write_arm64_report(report, args.bundles)
    print(f"{summary_table(report)}\n\n" + "".join(f"not run: {s}\n" for s in report.skipped)
          + "".join(f"FAIL: {f}\n" for f in report.failures)
          + f"{len(report.checks)} checks, {len(report.failures)} failure(s); report: {args.bundles / 'arm64.md'}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
