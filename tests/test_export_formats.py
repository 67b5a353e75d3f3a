"""ExecuTorch (.pte) and LiteRT (.tflite) bundles: files, manifest I/O, parity with torch, int8 I/O,
static-batch chunking, runtime fallbacks and clear errors when a runtime is missing."""

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from device_agent.bundle import Bundle, load_bundle
from device_agent.nmoe_local import LocalNMoE
from device_agent.runtime import UnsupportedFormat, open_runtime
from export.bundle_writer import DeviceModules, device_modules
from export.pt2e import quiet_native_output
from toolkit.artifacts import load_nmoe
from toolkit.cli import main
from toolkit.evaluate import predict
from toolkit.federated_data import FederatedData, prepare

CLIENTS = 3
FORMATS = ("executorch", "tflite")
SUFFIX = {"executorch": "pte", "tflite": "tflite"}
ROLES = ("extractor", "gate", "expert")


@pytest.fixture(scope="module")
def out(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles")
    assert main(["export", str(run_dir), "--out", str(out), "--quiet", "--formats", ",".join(FORMATS),
                 "--calibration-samples", "48"]) == 0
    return out


@pytest.fixture(scope="module")
def bundles(out: Path) -> dict[int, Bundle]:
    return {c: load_bundle(out / f"device-{c}") for c in range(CLIENTS)}


@pytest.fixture(scope="module")
def modules(run_dir: Path) -> list[DeviceModules]:
    return device_modules(load_nmoe(run_dir, "nmoe_fedce_fedgate"))


@pytest.fixture(scope="module")
def data(run_dir: Path) -> FederatedData:
    return prepare(load_nmoe(run_dir, "nmoe_fedce_fedgate").config.data)


def test_files_and_manifest_io(out: Path, bundles: dict[int, Bundle]) -> None:
    for c, bundle in bundles.items():
        files = {p.name for p in (out / f"device-{c}").iterdir()}
        assert files == {"manifest.json", "samples.npz"} | {
            f"{r}.{p}.{SUFFIX[f]}" for f in FORMATS for r in ROLES for p in ("fp32", "int8")}
        for e in bundle.manifest.models:
            assert e.inputs[0].shape[0] == 1 and e.outputs[0].shape[0] == 1  # static batch
            int8_io = e.format == "tflite" and e.precision == "int8"
            for spec in (e.inputs[0], e.outputs[0]):
                assert spec.dtype == ("int8" if int8_io else "float32")
                assert (spec.quantization is not None) == int8_io
                if int8_io:
                    assert spec.quantization.scale > 0 and -128 <= spec.quantization.zero_point <= 127
        extractor = bundle.model("extractor", "fp32", "tflite")
        assert extractor.inputs[0].shape == [1, *bundle.manifest.input.shape]
        assert extractor.outputs[0].shape == [1, bundle.manifest.latent_dim]


@pytest.mark.parametrize("fmt", FORMATS)
def test_models_match_torch(fmt: str, bundles: dict[int, Bundle], modules: list[DeviceModules],
                            data: FederatedData) -> None:
    for c, bundle in bundles.items():
        x = data.personal_test[c].x[:37]  # not a multiple of anything: chunking pads the tail
        z = predict(modules[c].extractor, x)
        cases = [("extractor", x, z), ("gate", z, predict(modules[c].gate, z)),
                 ("expert", z, predict(modules[c].expert, z))]
        for role, inputs, want in cases:
            fp32 = open_runtime(bundle, bundle.model(role, "fp32", fmt)).run(inputs.numpy())
            assert fp32.shape == want.shape and np.abs(fp32 - want.numpy()).max() < 1e-4, (c, role)
            int8 = open_runtime(bundle, bundle.model(role, "int8", fmt)).run(inputs.numpy())
            scale = np.abs(want.numpy()).max()
            assert np.abs(int8 - want.numpy()).mean() < 0.05 * scale, (c, role)
            if role == "expert":
                assert np.mean(int8.argmax(1) == want.numpy().argmax(1)) >= 0.9


def test_report_covers_every_variant_within_the_bound(out: Path) -> None:
    report = json.loads((out / "report.json").read_text())
    assert report["failures"] == []
    assert {(r["format"], r["precision"]) for r in report["nmoe"]} == {
        (f, p) for f in FORMATS for p in ("fp32", "int8")}
    assert len(report["models"]) == CLIENTS * len(ROLES) * len(FORMATS) * 2
    for r in report["nmoe"]:
        assert r["drop"] <= 1.0
        if r["precision"] == "fp32":
            assert r["drop"] == 0 and r["agreement"] == 1.0
    sizes = {(r["device"], r["format"], r["precision"]): r["model_bytes"] for r in report["nmoe"]}
    for (device, fmt, precision), size in sizes.items():
        if precision == "int8":
            assert size < 0.7 * sizes[(device, fmt, "fp32")]


def test_tflite_int8_io_is_quantized_from_the_manifest(bundles: dict[int, Bundle]) -> None:
    from ai_edge_litert.interpreter import Interpreter

    bundle = bundles[0]
    entry = bundle.model("expert", "int8", "tflite")
    z = bundle.samples()["latent"][:1]
    interpreter = Interpreter(model_content=bundle.model_bytes(entry))
    interpreter.allocate_tensors()
    i, o = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    (s_in, z_in), (s_out, z_out) = i["quantization"], o["quantization"]
    assert (s_in, z_in) == (entry.inputs[0].quantization.scale, entry.inputs[0].quantization.zero_point)
    interpreter.set_tensor(i["index"], np.clip(np.rint(z / s_in) + z_in, -128, 127).astype(np.int8))
    interpreter.invoke()
    want = (interpreter.get_tensor(o["index"]).astype(np.float32) - z_out) * s_out
    assert np.array_equal(open_runtime(bundle, entry).run(z), want)


def test_local_nmoe_runs_every_format(bundles: dict[int, Bundle]) -> None:
    for fmt in FORMATS:
        fleet = LocalNMoE(bundles, "fp32", fmt)
        for c, bundle in bundles.items():
            s = bundle.samples()
            prediction = fleet.predict(c, s["images"])
            assert np.abs(prediction.probs.sum(axis=1) - 1).max() < 1e-5
            assert np.abs(fleet.latents(c, s["images"]) - s["latent"]).max() < 1e-4


def block(monkeypatch: pytest.MonkeyPatch, *packages: str) -> None:
    """Make importing these packages (and any of their modules) fail, as if not installed."""
    for name in [m for m in sys.modules if m.partition(".")[0] in packages] + list(packages):
        monkeypatch.setitem(sys.modules, name, None)


def test_tflite_runtime_is_the_fallback(bundles: dict[int, Bundle], monkeypatch: pytest.MonkeyPatch) -> None:
    from ai_edge_litert.interpreter import Interpreter

    fallback = types.ModuleType("tflite_runtime.interpreter")
    fallback.Interpreter = Interpreter
    block(monkeypatch, "ai_edge_litert")
    monkeypatch.setitem(sys.modules, "tflite_runtime", types.ModuleType("tflite_runtime"))
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", fallback)
    bundle = bundles[1]
    runtime = open_runtime(bundle, bundle.model("expert", "fp32", "tflite"))
    assert "tflite-runtime" in runtime.name
    assert runtime.run(bundle.samples()["latent"]).shape == (8, bundle.manifest.num_classes)


@pytest.mark.parametrize("fmt, blocked, message", [
    ("tflite", ("ai_edge_litert", "tflite_runtime"), "format 'tflite' needs ai-edge-litert"),
    ("executorch", ("executorch",), ("format 'executorch' needs the executorch Python package, whose bindings "
                                    "also need torch")),
])
def test_missing_runtime_is_one_clear_error(fmt: str, blocked: tuple[str, ...], message: str,
                                            bundles: dict[int, Bundle], monkeypatch: pytest.MonkeyPatch) -> None:
    block(monkeypatch, *blocked)
    bundle = bundles[2]
    with pytest.raises(UnsupportedFormat, match=message):
        open_runtime(bundle, bundle.model("gate", "fp32", fmt))


def test_quiet_native_output_replays_on_failure(capfd: pytest.CaptureFixture[str]) -> None:
    with quiet_native_output():
        print("converter chatter")
        torch.zeros(1)
    assert "converter chatter" not in capfd.readouterr().out
    with pytest.raises(RuntimeError), quiet_native_output():
        print("the clue")
        raise RuntimeError("conversion failed")
    assert "the clue" in capfd.readouterr().err
