"""`nmoe export`: per-device bundles from a finished run dir, with a parity report.

Imports nothing heavy at load (toolkit.cli loads it as a plugin); torch and onnx are imported by
the command itself.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

from device_agent.cli import positive_int

FORMATS = {"onnx": "export.onnx_export", "executorch": "export.executorch_export",
           "tflite": "export.tflite_export"}  # format name -> module exposing FORMAT (a ModelFormat)
PRECISIONS = ("fp32", "int8")

HELP = """\
Export a trained NMoE from a run dir into one bundle folder per device, then check the bundles
against the torch models.

Each BUNDLES/device-<c>/ holds what device c runs: the shared feature extractor, its gate (none
for rangate: the manifest says routing "random") and its own expert, in every requested format
and precision, plus manifest.json (schema, sha256 of every file, input normalization,
provenance; see docs/bundle.md) and samples.npz (a few raw uint8 test images with the expected
fp32 outputs, for on-device self-checks). The device agent refuses a bundle whose hashes or
schema do not match.

Gate methods of toolkit.gates (docs/gates.md): fedgate_vl, localgate_vl and fedgate_ood bundles also
hold the shared expert every device runs itself (manifest schema 3; fedgate_ood adds the device's OOD
score, ood.npz); fedgate_heldout and fedgate_switch cannot be exported yet.

Formats: onnx (ONNX Runtime; dynamic batch), executorch (.pte lowered to XNNPACK) and tflite
(LiteRT, via litert-torch); the last two are exported for a static batch of 1 and the agent feeds
larger batches in chunks.

Precisions: fp32 is the exported graph; int8 is static quantization (int8 weights per channel,
int8 activations: ONNX QDQ, ExecuTorch/LiteRT PT2E) calibrated on each client's OWN training
images (and their latents), never on another client's. ONNX and ExecuTorch int8 models keep
float inputs/outputs; LiteRT int8 models have int8 inputs/outputs whose scale and zero point are
in the manifest. The export reads the run's dataset again (the same data.* settings as training).

Then every model runs through the device agent's runtime on the client's personalized test
set: BUNDLES/report.json and report.md give, per device x role x format x precision, the file
size, max abs diff vs torch fp32, agreement (extractor: cosine, gate: top-k set, expert:
argmax), batch-1 latency median/p99, and each device's NMoE accuracy with all bundles in one
process vs the torch fp32 NMoE.

With --check-arm64, every ONNX and LiteRT model also runs under emulated aarch64 (qemu-user,
Cortex-A72 and Cortex-A76; the first use builds a cached sysroot, see `make arm64-env`) and is
compared with the x86 outputs: BUNDLES/arm64.json and arm64.md.

Exit status: 0 when done; 1 when some device/format/precision loses more than
--max-accuracy-drop points of NMoE accuracy, or an ARM64 check fails (bundles and reports are
still written); 2 when the run dir, method or options are unusable.
"""

EPILOG = """\
examples:
  nmoe export runs/quick --out bundles/quick                        # best nmoe_*_fedgate, all formats
  nmoe export runs/quick --out bundles/pi --formats onnx,tflite --check-arm64
  nmoe export runs/quick --out bundles/rg --method nmoe_fedce_rangate --precision fp32
  nmoe export runs/gates --out bundles/vl --method nmoe_fedce_fedgate_vl --formats onnx
  nmoe export runs/quick --out bundles/q --calibration-samples 512 --max-accuracy-drop 0.5
"""


def _names(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """argparse type: a comma-separated subset of `allowed`."""
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        for name in names:
            if name not in allowed:
                raise argparse.ArgumentTypeError(f"unknown {name!r} (choose from {', '.join(allowed)})")
        if not names or len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(f"expected distinct names from {', '.join(allowed)}, got {text!r}")
        return names
    return parse


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `nmoe export`."""
    p = subparsers.add_parser("export", help="export a trained NMoE to per-device bundles (+ parity report)",
                              description=HELP, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run dir written by `nmoe train`")
    p.add_argument("--out", required=True, metavar="BUNDLES",
                   help="folder for device-<c>/ bundles and report.json/report.md (existing bundles are replaced)")
    p.add_argument("--method", metavar="NAME",
                   help="NMoE method nmoe_<stage1>_<gate> (default: the best nmoe_*_fedgate by personalized "
                        "accuracy in RUN_DIR/metrics.json)")
    p.add_argument("--formats", type=_names(tuple(FORMATS)), default=list(FORMATS), metavar="LIST",
                   help=f"comma-separated model formats: onnx (ONNX Runtime), executorch (.pte, XNNPACK), "
                        f"tflite (LiteRT) (default: {','.join(FORMATS)})")
    p.add_argument("--precision", type=_names(PRECISIONS), default=list(PRECISIONS), metavar="LIST",
                   help="comma-separated precisions: fp32, int8 (default: fp32,int8)")
    p.add_argument("--calibration-samples", type=positive_int, default=256, metavar="N",
                   help="int8 calibration images per client, drawn from its own training split (default: 256)")
    p.add_argument("--max-accuracy-drop", type=float, default=1.0, metavar="POINTS",
                   help="fail (exit 1) when a device's NMoE accuracy with a bundle variant is more than this many "
                        "percentage points below torch fp32 (default: 1.0)")
    p.add_argument("--check-arm64", action="store_true",
                   help="also run the ONNX and LiteRT models under emulated aarch64 and compare with x86")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from device_agent.runtime import MissingRuntime
    from export.bundle_writer import ExportError
    from toolkit.artifacts import ArtifactError
    from toolkit.data import DataError
    from toolkit.errors import DamagedFile

    try:
        return _run(args)
    except (ExportError, ArtifactError, DamagedFile, DataError, MissingRuntime) as e:
        print(f"nmoe: error: {e}", file=sys.stderr)
        return 2


def run_accuracies(run_dir: Path, method: str) -> list[float] | None:
    """Every device's personalized accuracy (percent) for `method` in the run's metrics.json, by client."""
    from toolkit.run_files import read_metrics

    rows = read_metrics(run_dir)["methods"].get(method, {}).get("per_client")
    return None if rows is None else [100 * r["personalized_accuracy"] for r in sorted(rows, key=lambda r: r["client"])]


def _run(args: argparse.Namespace) -> int:
    from export import parity
    from export.bundle_writer import best_method, device_modules, with_ood_scores, write_bundles
    from toolkit.artifacts import load_nmoe
    from toolkit.federated_data import prepare

    run_dir, out, show = Path(args.run_dir), Path(args.out), not args.quiet
    method = args.method or best_method(run_dir)
    trained = load_nmoe(run_dir, method)
    data = prepare(trained.config.data)
    modules = with_ood_scores(trained, device_modules(trained), data)
    formats = [importlib.import_module(FORMATS[name]).FORMAT for name in args.formats]
    bundles = write_bundles(trained, modules, data, run_dir, out, formats, args.precision,
                            args.calibration_samples, show)
    models, nmoe, ood = parity.measure(bundles, modules, data, args.formats, args.precision, show,
                                  run_accuracies(run_dir, method))
    report = parity.build_report(run_dir, method, args.max_accuracy_drop, models, nmoe, ood)
    parity.write_report(report, out)
    print(f"{method}: {len(bundles)} bundles in {out}\n\n{parity.nmoe_table(report)}\n\nreport: {out / 'report.md'}")
    failures = list(report.failures)
    if args.check_arm64:
        from export.arm64_check import check_arm64, write_arm64_report

        arm64 = check_arm64(out)
        write_arm64_report(arm64, out)
        failures += arm64.failures
        print(f"ARM64 check: {len(arm64.failures)} failure(s); report: {out / 'arm64.md'}")
    for failure in failures:
        print(f"nmoe: error: {failure}", file=sys.stderr)
    return 1 if failures else 0
