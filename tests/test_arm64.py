"""ARM64 parity under qemu-user (export.arm64_check), the on-device self-check (device_agent.selfcheck), and a
field trial with emulated aarch64 agents (`nmoe trial --arm64-devices`).

The emulated environment comes from scripts/arm64_env.sh: check_arm64 runs it, so a machine without
the cache builds it here (once) instead of skipping.
"""

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from device_agent import runtime, selfcheck
from export import arm64_check
from export.arm64_check import check_arm64, compare, write_arm64_report
from toolkit.cli import main

FORMATS = ("onnx", "tflite")
OUTPUTS = 3 * 3 * len(FORMATS) * 2  # devices x roles x formats x precisions


@pytest.fixture(scope="module")
def bundles_dir(onnx_tflite_bundles: Path) -> Path:
    """Three devices, ONNX and LiteRT, fp32 and int8 (the shared session export)."""
    return onnx_tflite_bundles


def devices(bundles_dir: Path) -> list[str]:
    return [str(p) for p in sorted(bundles_dir.glob("device-*"))]


def test_arm64_parity(bundles_dir: Path, tmp_path: Path) -> None:
    report = check_arm64(bundles_dir, cpus=("cortex-a72", "cortex-a76"), formats=(*FORMATS, "executorch"))
    assert report.failures == []
    assert report.formats == list(FORMATS) and report.skipped == ["executorch: not in these bundles"]
    assert [(r.cpu, r.machine) for r in report.runs][1:] == [("cortex-a72", "aarch64"), ("cortex-a76", "aarch64")]
    assert len(report.checks) == 2 * OUTPUTS
    for c in report.checks:
        if c.precision == "fp32":
            assert c.max_abs_diff < 1e-4, c
        else:
            assert c.top1_agreement == 1.0, c
    write_arm64_report(report, tmp_path)
    assert json.loads((tmp_path / "arm64.json").read_text())["machine"]["qemu"].startswith("qemu-aarch64")
    md = (tmp_path / "arm64.md").read_text()
    assert "| cortex-a76 | device-1 | expert | tflite | int8 |" in md and "FAIL" not in md


def test_arm64_check_reports_a_tampered_output(bundles_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The emulated outputs, shifted by 1e-3 in one fp32 model, fail the check (the same pipeline as above)."""
    real = arm64_check._load

    def tampered(path: Path) -> dict[str, np.ndarray]:
        outputs = real(path)
        if path.name != "native.npz":
            outputs["device-1/gate/onnx/fp32"] = outputs["device-1/gate/onnx/fp32"] + np.float32(1e-3)
        return outputs

    monkeypatch.setattr(arm64_check, "_load", tampered)
    report = check_arm64(bundles_dir, cpus=("cortex-a72",))
    assert len(report.failures) == 1 and report.failures[0].startswith("cortex-a72 device-1 gate onnx fp32: max abs")
    assert [(c.device, c.role, c.format, c.precision) for c in report.checks if not c.passed] == [
        ("device-1", "gate", "onnx", "fp32")]
    assert arm64_check.main([str(bundles_dir), "--cpus", "cortex-a72"]) == 1
    assert "**FAIL**" in (bundles_dir / "arm64.md").read_text()


def test_compare_thresholds() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 10)).astype(np.float32)
    native = {"d/expert/onnx/fp32": x, "d/expert/onnx/int8": x, "d/extractor/tflite/int8": x}

    def failed(**changed: np.ndarray) -> list[str]:
        """compare's failures when the emulated outputs are the native ones with `changed` (key: "/" as "__")."""
        checks, failures = compare(native, {**native, **{k.replace("__", "/"): v for k, v in changed.items()}}, "a72")
        assert len(checks) == len(native) and len(failures) == sum(not c.passed for c in checks)
        return failures

    assert failed() == []
    assert failed(d__expert__onnx__fp32=x + np.float32(5e-5)) == []
    assert len(failed(d__expert__onnx__fp32=x + np.float32(2e-4))) == 1
    assert len(failed(d__expert__onnx__fp32=np.full_like(x, np.nan))) == 1
    # int8: any diff is fine while every row keeps its argmax; one flipped row fails
    top = x.argmax(axis=1)
    assert failed(d__expert__onnx__int8=x * 1.5) == []
    flipped = x.copy()
    flipped[3, (top[3] + 1) % 10] = x[3].max() + 1
    assert failed(d__extractor__tflite__int8=flipped) == [
        "a72 d extractor tflite int8: max abs diff " + f"{np.abs(flipped - x).max():.2e}"
        + ", top-1 agreement 87.5% vs x86 (needs 100% top-1)"]
    checks, failures = compare(native, {"d/expert/onnx/fp32": x[:4], "d/expert/onnx/int8": x}, "a72")
    assert failures == ["a72 d expert onnx fp32: shape [4, 10] under emulation, [8, 10] natively",
                        "a72 d extractor tflite int8: output only natively"]
    assert [(c.role, c.precision, c.passed) for c in checks] == [("expert", "int8", True)]


def test_selfcheck_passes_and_saves_every_output(bundles_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert selfcheck.main([*devices(bundles_dir), "--save", str(tmp_path / "out.npz")]) == 0
    out = capsys.readouterr().out
    assert "selfcheck: ok" in out and "FAIL" not in out and out.count(" ok ") == OUTPUTS // 2
    with np.load(tmp_path / "out.npz") as npz:
        assert len(npz.files) == OUTPUTS and npz["device-1/expert/tflite/int8"].shape == (8, 10)
    assert selfcheck.main([devices(bundles_dir)[0], "--formats", "tflite", "--precision", "int8", "--json"]) == 0
    models = json.loads(capsys.readouterr().out)["models"]
    assert [(m["role"], m["format"], m["precision"]) for m in models] == [
        (role, "tflite", "int8") for role in ("extractor", "gate", "expert")]
    assert all(m["agree"] >= 6 for m in models)


def rewrite_samples(bundle: Path, **changed: np.ndarray) -> None:
    """Replace arrays of samples.npz and fix the manifest's size and sha256, so only the contents are wrong."""
    with np.load(bundle / "samples.npz") as npz:
        arrays = {k: npz[k] for k in npz.files} | changed
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    (bundle / "samples.npz").write_bytes(data)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["samples"] |= {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_selfcheck_fails_on_wrong_expected_outputs(bundles_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    bundle = Path(shutil.copytree(devices(bundles_dir)[0], tmp_path / "device-0"))
    with np.load(bundle / "samples.npz") as npz:
        probs = npz["expert_probs"]
    rewrite_samples(bundle, expert_probs=np.roll(probs, 1, axis=1))
    assert selfcheck.main([str(bundle)]) == 1
    out = capsys.readouterr().out
    assert out.count("FAIL") == 3  # expert fp32 onnx, expert fp32 tflite, and the verdict
    assert "selfcheck: FAIL: 2 fp32 model(s) differ by more than 0.001" in out


def test_selfcheck_unusable_bundle_or_runtime(bundles_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    bundle = Path(shutil.copytree(devices(bundles_dir)[0], tmp_path / "device-0"))
    (bundle / "gate.fp32.onnx").write_bytes(b"not a model")
    assert selfcheck.main([str(bundle)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"selfcheck: error: {bundle / 'gate.fp32.onnx'}") and "\n" not in err

    monkeypatch.delitem(runtime.RUNTIMES, "tflite")
    assert selfcheck.main([devices(bundles_dir)[0]]) == 2
    assert "format 'tflite' is not supported" in capsys.readouterr().err
    assert selfcheck.main([devices(bundles_dir)[0], "--formats", "executorch"]) == 2
    assert "no executorch fp32,int8 model" in capsys.readouterr().err


def test_a_trial_with_two_emulated_aarch64_devices_gives_local_nmoe_s_predictions(
        bundles_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """device-1 and device-2 run `nmoe agent` under qemu-user (Cortex-A72), device-0 natively: they serve their
    experts to each other and classify together over mosquitto. Sized for emulation (~300x slower): 4 samples per
    device at 1/s, 20 s deadlines, 10 min to come online; 35 s on a 2-core machine at load 15."""
    monkeypatch.delenv("QEMU_CPU", raising=False)
    out = tmp_path / "trial"
    status = main(["trial", "--bundles", str(bundles_dir), "--out", str(out), "--quiet", "--arm64-devices", "2",
                   "--samples", "4", "--rate", "1", "--deadline-ms", "20000", "--online-timeout", "600"])
    summary = json.loads((out / "trial.json").read_text())
    assert status == 0
    assert summary["fleet"]["arm64_devices"] == {"device-1": "cortex-a72", "device-2": "cortex-a72"}
    counts, exact = summary["counts"], summary["exactness"]
    assert counts["sent"] == counts["answered"] == 12 and counts["failed"] == 0
    assert exact["compared"] == 12 and exact["mismatches"] == exact["degraded"] == exact["unverified"] == 0
    assert exact["max_abs_prob_diff"] < 1e-4  # ARM and x86 kernels may differ in the last bits, never in a class
    matrix = summary["routing"]["matrix"]  # answered requests each expert's output was combined into
    assert matrix["device-0"][1] + matrix["device-0"][2] > 0  # the x86 device used emulated experts ...
    assert matrix["device-1"][0] + matrix["device-2"][0] > 0  # ... and the emulated devices the x86 one
    assert all(a["exit_status"] == 0 and a["inferences"] > 0 for a in summary["agents"].values())  # SIGTERM: clean
