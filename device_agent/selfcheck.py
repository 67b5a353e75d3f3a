"""On-device self-check: run a bundle's models on its samples.npz and compare with the stored fp32 outputs.

    python -m device_agent.selfcheck BUNDLE_DIR [BUNDLE_DIR ...] [--formats onnx,tflite]
                                     [--precision fp32,int8] [--save OUT.npz] [--json]

The extractor gets `preprocess(images)`, the gate and the expert get the stored `latent` (so each
diff is the model's own); the expert's output is compared after a softmax with `expert_probs`.
Exit status: 0 when every fp32 model is within FP32_TOLERANCE of the expected outputs (int8 models
are reported, not judged); 1 when one is not; 2 when a bundle or a runtime is unusable.
`--save` writes every raw model output into one npz keyed `<device_id>/<role>/<format>/<precision>`
(what `export.arm64_check` compares across machines). numpy and the runtimes only: runs on devices.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from device_agent.bundle import PRECISIONS, Bundle, BundleError, ModelEntry, load_bundle
from device_agent.nmoe_local import preprocess, softmax, top_k_route
from device_agent.runtime import UnsupportedFormat, open_runtime

FP32_TOLERANCE = 1e-3
EXPECTED = {"extractor": "latent", "gate": "gate_logits", "expert": "expert_probs"}  # role -> samples key


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
    raw = runtime.run(model_input(bundle, entry.role, samples))
    expected = _sample(bundle, samples, EXPECTED[entry.role])
    if raw.shape != expected.shape:
        raise BundleError(f"{bundle.path / entry.file}: output shape {list(raw.shape)}, but samples.npz "
                          f"{EXPECTED[entry.role]} has {list(expected.shape)}")
    output = softmax(raw) if entry.role == "expert" else raw
    diff = float(np.abs(output - expected).max())
    agree, kind = _agreement(entry.role, output, expected, bundle.manifest.top_k)
    passed = entry.precision != "fp32" or diff <= FP32_TOLERANCE  # NaN fails
    check = ModelCheck(bundle.manifest.device_id, entry.role, entry.format, entry.precision, runtime.name,
                       len(raw), diff, agree, kind, passed)
    return check, raw


def check_bundle(bundle: Bundle, formats: Sequence[str] | None, precisions: Sequence[str]
                 ) -> list[tuple[ModelCheck, np.ndarray]]:
    """Every model of the bundle in `formats` (None: all) and `precisions`, with its raw output."""
    samples = bundle.samples()
    return [check_model(bundle, e, samples) for e in bundle.manifest.models
            if (formats is None or e.format in formats) and e.precision in precisions]


def table(checks: Sequence[ModelCheck]) -> str:
    """One row per model."""
    header = (f"{'device':<10} {'role':<9} {'format':<10} {'prec':<5} {'max abs diff':>12}  {'agreement':<16} "
              f"{'result':<6} runtime")
    rows = [header]
    for c in checks:
        result = ("ok" if c.passed else "FAIL") if c.precision == "fp32" else "-"
        rows.append(f"{c.device_id:<10} {c.role:<9} {c.format:<10} {c.precision:<5} {c.max_abs_diff:>12.2e}  "
                    f"{f'{c.agree}/{c.samples} {c.agreement_kind}':<16} {result:<6} {c.runtime}")
    return "\n".join(rows)


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
    p.add_argument("--formats", type=_names, metavar="LIST", help="comma-separated formats (default: all in the bundle)")
    p.add_argument("--precision", type=_precisions, default=list(PRECISIONS), metavar="LIST",
                   help="comma-separated precisions (default: fp32,int8)")
    p.add_argument("--save", type=Path, metavar="OUT.npz", help="write every raw model output into this npz")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Check the bundles; 0 ok, 1 an fp32 model is off, 2 unusable bundle or runtime."""
    args = parse_args(argv)
    try:
        results = [r for path in args.bundles for r in check_bundle(load_bundle(path), args.formats, args.precision)]
    except (BundleError, UnsupportedFormat) as e:
        print(f"selfcheck: error: {e}", file=sys.stderr)
        return 2
    if not results:
        print(f"selfcheck: error: no {','.join(args.formats or ['any'])} {','.join(args.precision)} model in "
              f"{', '.join(map(str, args.bundles))}", file=sys.stderr)
        return 2
    checks = [c for c, _ in results]
    if args.save:
        with args.save.open("wb") as f:
            np.savez(f, **{c.key: raw for c, raw in results})
    failed = sum(not c.passed for c in checks)
    if args.json:
        print(json.dumps({"machine": platform.machine(), "python": platform.python_version(),
                          "numpy": np.__version__, "passed": not failed, "models": [asdict(c) for c in checks]}))
    else:
        verdict = (f"FAIL: {failed} fp32 model(s) differ by more than" if failed else
                   "ok: every fp32 model within")
        print(f"{table(checks)}\n\nselfcheck: {verdict} {FP32_TOLERANCE:g} of the expected outputs")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
