"""On-device self-check: run a bundle's models on its samples.npz and compare with the stored fp32 outputs.

    python -m device_agent.selfcheck BUNDLE_DIR [BUNDLE_DIR ...] [--formats onnx,tflite]
                                     [--precision fp32,int8] [--save OUT.npz] [--json]

The extractor gets `preprocess(images)`, the gate and the expert get the stored `latent` (so each
diff is the model's own); the expert's output is compared after a softmax with `expert_probs` (a shared
expert's with `shared_expert_probs`).
Without --formats it checks every format of the bundle this device has a runtime for and reports
the others as skipped (a Pi with only onnxruntime checks the ONNX models of an ONNX + LiteRT bundle);
a format named in --formats must run. Exit status: 0 when every fp32 model checked is within
FP32_TOLERANCE of the expected outputs (int8 models are reported, not judged); 1 when one is not;
2 when a bundle or a runtime is unusable, or nothing could be checked.
`--save` writes every raw model output into one npz keyed `<device_id>/<role>/<format>/<precision>`
(what `export.arm64_check` compares across machines). numpy and the runtimes only: runs on devices.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from device_agent.bundle import PRECISIONS, Bundle, BundleError, ModelEntry, load_bundle
from device_agent.nmoe_local import preprocess, softmax, top_k_route
from device_agent.runtime import (
    MissingRuntime,
    UnsupportedFormat,
    checked_run,
    error_summary,
    open_runtime,
)

FP32_TOLERANCE = 1e-3
EXPECTED = {"extractor": "latent", "gate": "gate_logits", "expert": "expert_probs",
            "shared_expert": "shared_expert_probs"}  # role -> samples key
EXPERT_ROLES = ("expert", "shared_expert")  # latent -> class logits, compared after a softmax


@dataclass(frozen=True)
class ModelCheck:
    """One model file run on its bundle's samples."""

    device_id: str
    role: str
    format: str
    precision: str
    runtime: str
    samples: int
    max_abs_diff: float  # vs the expected fp32 output (the expert after softmax)
    agree: int  # rows whose top-1 (gate: top-k expert set) matches the expected output's
    agreement_kind: str
    passed: bool  # int8 models always pass: their error is quantization, reported not judged

    @property
    def key(self) -> str:
        """The --save key of this model's raw output."""
        return f"{self.device_id}/{self.role}/{self.format}/{self.precision}"


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of rows whose argmax over the last axis is the same in a and b."""
    return float(np.mean(a.argmax(axis=-1) == b.argmax(axis=-1)))


def _sample(bundle: Bundle, samples: dict[str, np.ndarray], key: str) -> np.ndarray:
    if key not in samples:
        raise BundleError(f"{bundle.path / 'samples.npz'}: no {key!r} (has: {', '.join(sorted(samples))})")
    return samples[key]


def model_input(bundle: Bundle, role: str, samples: dict[str, np.ndarray]) -> np.ndarray:
    """What the model is fed: preprocessed images (extractor) or the stored fp32 latents."""
    if role != "extractor":
        return _sample(bundle, samples, "latent")
    try:
        return preprocess(_sample(bundle, samples, "images"), bundle.manifest.input)
    except ValueError as e:
        raise BundleError(f"{bundle.path / 'samples.npz'}: images: {e}") from None


def _agreement(role: str, output: np.ndarray, expected: np.ndarray, top_k: int) -> tuple[int, str]:
    if role == "gate":
        same = np.sort(top_k_route(output, top_k)[0], axis=1) == np.sort(top_k_route(expected, top_k)[0], axis=1)
        return int(same.all(axis=1).sum()), f"top-{top_k} set"
    return round(top1_agreement(output, expected) * len(output)), "top-1"


def check_model(bundle: Bundle, entry: ModelEntry, samples: dict[str, np.ndarray]) -> tuple[ModelCheck, np.ndarray]:
    """Run one model on the samples: its check and its raw output."""
    runtime = open_runtime(bundle, entry)
    raw = checked_run(runtime, model_input(bundle, entry.role, samples), bundle.path / entry.file)
    expected = _sample(bundle, samples, EXPECTED[entry.role])
    if raw.shape != expected.shape:
        raise BundleError(f"{bundle.path / entry.file}: output shape {list(raw.shape)}, but samples.npz "
                          f"{EXPECTED[entry.role]} has {list(expected.shape)}")
    output = softmax(raw) if entry.role in EXPERT_ROLES else raw
    diff = float(np.abs(output - expected).max())
    agree, kind = _agreement(entry.role, output, expected, bundle.manifest.top_k)
    passed = entry.precision != "fp32" or diff <= FP32_TOLERANCE  # NaN fails
    check = ModelCheck(bundle.manifest.device_id, entry.role, entry.format, entry.precision, runtime.name,
                       len(raw), diff, agree, kind, passed)
    return check, raw


@dataclass(frozen=True)
class Skipped:
    """A format of a bundle that was not checked because this device has no runtime for it."""

    device_id: str
    format: str
    reason: str


def check_bundle(bundle: Bundle, formats: Sequence[str] | None, precisions: Sequence[str]
                 ) -> tuple[list[tuple[ModelCheck, np.ndarray]], list[Skipped]]:
    """Every model of the bundle in `formats` and `precisions`, with its raw output. With formats None
    (all in the bundle), a format whose runtime is not installed is skipped and reported; a format asked
    for by name must run (MissingRuntime)."""
    samples = read_samples(bundle)
    results: list[tuple[ModelCheck, np.ndarray]] = []
    skipped: dict[str, Skipped] = {}
    for entry in bundle.manifest.models:
        if (formats is not None and entry.format not in formats) or entry.precision not in precisions \
                or entry.format in skipped:
            continue
        try:
            results.append(check_model(bundle, entry, samples))
        except MissingRuntime as e:
            if formats is not None:
                raise
            skipped[entry.format] = Skipped(bundle.manifest.device_id, entry.format, str(e))
    return results, list(skipped.values())


def read_samples(bundle: Bundle) -> dict[str, np.ndarray]:
    """The bundle's samples.npz (BundleError when it is not a readable npz, even with a matching sha256)."""
    try:
        return bundle.samples()
    except BundleError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise BundleError(f"{bundle.path / 'samples.npz'}: not a readable .npz ({error_summary(e)}); "
                          "export the bundle again") from None


def table(checks: Sequence[ModelCheck]) -> str:
    """One row per model."""
    header = (f"{'device':<10} {'role':<13} {'format':<10} {'prec':<5} {'max abs diff':>12}  {'agreement':<16} "
              f"{'result':<6} runtime")
    rows = [header]
    for c in checks:
        result = ("ok" if c.passed else "FAIL") if c.precision == "fp32" else "-"
        rows.append(f"{c.device_id:<10} {c.role:<13} {c.format:<10} {c.precision:<5} {c.max_abs_diff:>12.2e}  "
                    f"{f'{c.agree}/{c.samples} {c.agreement_kind}':<16} {result:<6} {c.runtime}")
    return "\n".join(rows)


def skipped_lines(skipped: Sequence[Skipped]) -> str:
    """One line per format skipped on this device, grouped over devices ("" when none)."""
    by_format: dict[tuple[str, str], list[str]] = {}
    for s in skipped:
        by_format.setdefault((s.format, s.reason), []).append(s.device_id)
    return "".join(f"skipped {fmt} models of {', '.join(devices)}: {reason}\n"
                   for (fmt, reason), devices in by_format.items())


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _precisions(text: str) -> list[str]:
    names = _names(text)
    if not names or set(names) - set(PRECISIONS):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(PRECISIONS)}, got {text!r}")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m device_agent.selfcheck", description=__doc__.split("\n\n")[0])
    p.add_argument("bundles", nargs="+", type=Path, metavar="BUNDLE_DIR", help="a device-<c>/ bundle folder")
    p.add_argument("--formats", type=_names, metavar="LIST",
                   help="comma-separated formats, each must run (default: all in the bundle that this device has "
                        "a runtime for; the others are reported as skipped)")
    p.add_argument("--precision", type=_precisions, default=list(PRECISIONS), metavar="LIST",
                   help="comma-separated precisions (default: fp32,int8)")
    p.add_argument("--save", type=Path, metavar="OUT.npz", help="write every raw model output into this npz")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Check the bundles; 0 ok, 1 an fp32 model is off, 2 unusable bundle or runtime."""
    args = parse_args(argv)
    results: list[tuple[ModelCheck, np.ndarray]] = []
    skipped: list[Skipped] = []
    try:
        for path in args.bundles:
            checked, not_run = check_bundle(load_bundle(path), args.formats, args.precision)
            results += checked
            skipped += not_run
    except (BundleError, UnsupportedFormat) as e:
        print(f"selfcheck: error: {e}", file=sys.stderr)
        return 2
    if not results:
        why = f" (skipped: {'; '.join(sorted({s.reason for s in skipped}))})" if skipped else ""
        print(f"selfcheck: error: no {','.join(args.formats or ['any'])} {','.join(args.precision)} model in "
              f"{', '.join(map(str, args.bundles))} that this device can run{why}", file=sys.stderr)
        return 2
    checks = [c for c, _ in results]
    if args.save:
        with args.save.open("wb") as f:  # (numpy's stub checks **arrays against savez's allow_pickle: ignored)
            np.savez(f, **{c.key: raw for c, raw in results})  # type: ignore[arg-type]
    failed = sum(not c.passed for c in checks)
    if args.json:
        print(json.dumps({"machine": platform.machine(), "python": platform.python_version(),
                          "numpy": np.__version__, "passed": not failed, "models": [asdict(c) for c in checks],
                          "skipped": [asdict(s) for s in skipped]}))
    else:
        verdict = (f"FAIL: {failed} fp32 model(s) differ by more than" if failed else
                   "ok: every fp32 model within")
        print(f"{table(checks)}\n{skipped_lines(skipped)}\nselfcheck: {verdict} {FP32_TOLERANCE:g} of the "
              "expected outputs" + (" (skipped formats not checked)" if skipped else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
