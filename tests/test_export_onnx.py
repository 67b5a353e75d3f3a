"""`nmoe export` to ONNX: files, manifest, parity with torch, own-data calibration, LocalNMoE, CLI."""

import contextlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from device_agent.bundle import Bundle, load_bundle
from device_agent.nmoe_local import LocalNMoE
from device_agent.runtime import open_runtime
from export import onnx_export
from export.bundle_writer import PROVENANCE_PACKAGES, DeviceModules, device_modules
from toolkit.artifacts import TrainedNMoE, load_nmoe
from toolkit.cli import main
from toolkit.evaluate import ExpertOutputs, gate_router, nmoe_predict, predict
from toolkit.federated_data import FederatedData, prepare, raw_images

METHOD = "nmoe_fedce_fedgate"
CLIENTS = 3
CALIBRATION = 48


@dataclass(frozen=True)
class Export:
    out: Path
    code: int
    stdout: str
    calibrations: list[tuple[int, str, np.ndarray]]  # (device, role, calibration inputs)


def run_cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def exported(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Export:
    """fp32 + int8 through the CLI, recording every int8 calibration set."""
    out = tmp_path_factory.mktemp("bundles")
    calls = []
    real = onnx_export.quantize_int8

    def spy(fp32: Path, path: Path, input_name: str, calibration: np.ndarray) -> None:
        device = int(re.search(r"device-(\d+)", path.parent.name).group(1))
        calls.append((device, path.name.split(".")[0], calibration.copy()))
        real(fp32, path, input_name, calibration)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_export, "quantize_int8", spy)
        code, stdout, _ = run_cli(["export", str(run_dir), "--out", str(out), "--quiet", "--formats", "onnx",
                                   "--calibration-samples", str(CALIBRATION), "--max-accuracy-drop", "10"])
    return Export(out, code, stdout, calls)


@pytest.fixture(scope="module")
def trained(run_dir: Path) -> TrainedNMoE:
    return load_nmoe(run_dir, METHOD)


@pytest.fixture(scope="module")
def data(trained: TrainedNMoE) -> FederatedData:
    return prepare(trained.config.data)


@pytest.fixture(scope="module")
def modules(trained: TrainedNMoE) -> list[DeviceModules]:
    return device_modules(trained)


@pytest.fixture(scope="module")
def bundles(exported: Export) -> dict[int, Bundle]:
    return {c: load_bundle(exported.out / f"device-{c}") for c in range(CLIENTS)}


def test_cli_writes_bundles_and_report(exported: Export) -> None:
    assert exported.code == 0
    assert "nmoe_fedce_fedgate" in exported.stdout and "| device-2 | onnx | int8 |" in exported.stdout
    report = json.loads((exported.out / "report.json").read_text())
    assert report["method"] == METHOD and report["failures"] == []
    assert len(report["models"]) == CLIENTS * 3 * 2 and len(report["nmoe"]) == CLIENTS * 2
    for row in report["models"]:
        assert row["latency_us_median"] > 0 and row["latency_us_p99"] >= row["latency_us_median"]
    assert "## NMoE accuracy per device" in (exported.out / "report.md").read_text()
    for c in range(CLIENTS):
        files = {p.name for p in (exported.out / f"device-{c}").iterdir()}
        assert files == {"manifest.json", "samples.npz"} | {
            f"{role}.{p}.onnx" for role in ("extractor", "gate", "expert") for p in ("fp32", "int8")}
    assert not list(exported.out.glob(".*")), "scratch folders left behind"


def test_manifest_fields(exported: Export, run_dir: Path, trained: TrainedNMoE) -> None:
    m = json.loads((exported.out / "device-1" / "manifest.json").read_text())
    dataset = json.loads((run_dir / "dataset.json").read_text())
    assert m["schema_version"] == 2 and m["device_id"] == "device-1" and m["expert_id"] == 1
    assert m["model_version"] == trained.config.hash()
    assert (m["num_experts"], m["top_k"], m["latent_dim"], m["num_classes"]) == (CLIENTS, 2, 16, 10)
    assert m["class_names"] == dataset["class_names"] and m["routing"] == "gate"
    assert m["input"] == {"shape": dataset["input_shape"], "dtype": "uint8", "scale": dataset["scale"],
                          "mean": dataset["mean"], "std": dataset["std"], "layout": "NCHW"}
    assert {(e["role"], e["format"], e["precision"]) for e in m["models"]} == {
        (r, "onnx", p) for r in ("extractor", "gate", "expert") for p in ("fp32", "int8")}
    ext = next(e for e in m["models"] if e["file"] == "extractor.int8.onnx")
    assert ext["inputs"] == [{"name": "x", "shape": ["batch", 1, 16, 16], "dtype": "float32", "quantization": None}]
    assert ext["outputs"] == [{"name": "latent", "shape": ["batch", 16], "dtype": "float32", "quantization": None}]
    assert ext["bytes"] == (exported.out / "device-1" / ext["file"]).stat().st_size
    p = m["provenance"]
    assert p["method"] == METHOD and p["config_hash"] == trained.config.hash() and p["built_by"] == "export"
    assert p["run_dir"] == str(run_dir.resolve()) and set(p["packages"]) == set(PROVENANCE_PACKAGES)
    assert m["samples"]["file"] == "samples.npz"


def test_fp32_onnx_matches_torch(bundles: dict[int, Bundle], modules: list[DeviceModules],
                                 data: FederatedData) -> None:
    for c, bundle in bundles.items():
        x = data.personal_test[c].x
        z = predict(modules[c].extractor, x)
        cases = [("extractor", x, z), ("gate", z, predict(modules[c].gate, z)),
                 ("expert", z, predict(modules[c].expert, z))]
        for role, inputs, want in cases:
            runtime = open_runtime(bundle, bundle.model(role, "fp32"))
            got = runtime.run(inputs.numpy())
            assert np.abs(got - want.numpy()).max() < 1e-4, (c, role)
            assert np.abs(runtime.run(inputs[:1].numpy()) - want[:1].numpy()).max() < 1e-4  # dynamic batch


def test_int8_agrees_and_is_smaller(exported: Export) -> None:
    report = json.loads((exported.out / "report.json").read_text())
    rows = {(r["device"], r["role"], r["precision"]): r for r in report["models"]}
    for c in range(CLIENTS):
        d = f"device-{c}"
        assert rows[(d, "extractor", "int8")]["agreement"] > 0.99  # cosine
        assert rows[(d, "gate", "int8")]["agreement"] >= 0.9  # top-k set
        assert rows[(d, "expert", "int8")]["agreement"] >= 0.9  # argmax
        assert rows[(d, "extractor", "int8")]["bytes"] < 0.6 * rows[(d, "extractor", "fp32")]["bytes"]
    nmoe = {(r["device"], r["precision"]): r for r in report["nmoe"]}
    for c in range(CLIENTS):
        int8, fp32 = nmoe[(f"device-{c}", "int8")], nmoe[(f"device-{c}", "fp32")]
        assert int8["model_bytes"] < fp32["model_bytes"] and int8["agreement"] >= 0.9
        assert fp32["drop"] == 0 and fp32["agreement"] == 1.0


def test_calibration_uses_only_the_clients_own_training_data(exported: Export, modules: list[DeviceModules],
                                                             data: FederatedData) -> None:
    assert sorted((d, r) for d, r, _ in exported.calibrations) == sorted(
        (c, r) for c in range(CLIENTS) for r in ("extractor", "gate", "expert"))
    for device, role, calibration in exported.calibrations:
        own = data.train[device].x
        if role == "extractor":
            assert len(calibration) == CALIBRATION
            rows = own.flatten(1).numpy()
        else:
            rows = predict(modules[device].extractor, own).numpy()
        flat = calibration.reshape(len(calibration), -1)
        nearest = np.abs(flat[:, None, :] - rows[None, :, :]).max(axis=2).min(axis=1)
        assert nearest.max() < 1e-5, (device, role)  # every calibration row is one of its own samples


def test_local_nmoe_equals_torch_nmoe(bundles: dict[int, Bundle], modules: list[DeviceModules],
                                      data: FederatedData, run_dir: Path) -> None:
    fleet = LocalNMoE(bundles, "fp32")
    per_client = json.loads((run_dir / "metrics.json").read_text())["methods"][METHOD]["per_client"]
    for c in range(CLIENTS):
        test = data.personal_test[c]
        got = fleet.predict(c, raw_images(test.x, bundles[c].manifest.input))
        z = predict(modules[c].extractor, test.x)
        probs = torch.stack([torch.softmax(predict(m.expert, z), dim=-1) for m in modules], dim=1)
        want, idx = nmoe_predict(gate_router(modules[c].gate, 2), ExpertOutputs(z, probs))
        assert np.array_equal(got.labels, want.argmax(dim=1).numpy())
        assert np.array_equal(np.sort(got.experts, axis=1), np.sort(idx.numpy(), axis=1))
        assert np.abs(got.probs - want.numpy()).max() < 1e-4
        accuracy = float(np.mean(got.labels == test.y.numpy()))
        assert accuracy == pytest.approx(per_client[c]["personalized_accuracy"], abs=1e-6)


def test_cli_accuracy_drop_fails_but_writes_everything(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "rangate"
    (out / "device-7").mkdir(parents=True)  # a bundle of an earlier export of a larger fleet
    (out / "device-7" / "manifest.json").write_text("{}")
    code, _, err = run_cli(["export", str(run_dir), "--out", str(out), "--method", "nmoe_fedce_rangate",
                            "--formats", "onnx", "--precision", "fp32", "--max-accuracy-drop", "-1", "--quiet"])
    assert code == 1
    assert "nmoe: error: device-0 onnx fp32: NMoE accuracy" in err and "--max-accuracy-drop -1" in err
    report = json.loads((out / "report.json").read_text())
    assert len(report["failures"]) == CLIENTS and (out / "report.md").is_file()
    assert sorted(p.name for p in out.iterdir()) == [*(f"device-{c}" for c in range(CLIENTS)), "report.json",
                                                      "report.md"]
    bundle = load_bundle(out / "device-0")
    assert bundle.manifest.routing == "random"
    assert {e.role for e in bundle.manifest.models} == {"extractor", "expert"}
    assert "gate_logits" not in bundle.samples()


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/run"], "is not a finished run dir"),
    (["RUN", "--method", "fedavg"], "'fedavg' is not an NMoE method"),
    (["RUN", "--method", "nmoe_fedsc_fedgate"], "did not train nmoe_fedsc_fedgate"),
])
def test_cli_unusable_input_is_one_line_exit_2(args: list[str], message: str, run_dir: Path, tmp_path: Path) -> None:
    args = [str(run_dir) if a == "RUN" else a for a in args]
    code, _, err = run_cli(["export", *args, "--out", str(tmp_path / "b"), "--quiet"])
    assert code == 2 and err.startswith("nmoe: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "b").exists()


def test_cli_unknown_format_is_a_usage_error(run_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(run_dir), "--out", str(tmp_path), "--formats", "onnx,coreml"])
    assert exit_info.value.code == 2
    assert "unknown 'coreml' (choose from onnx, executorch, tflite)" in capsys.readouterr().err
