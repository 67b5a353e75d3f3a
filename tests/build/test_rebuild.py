"""A device rebuilds its bundle from new weights (device_agent.rebuild): what it writes, runs and refuses."""

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from device_agent import bundle_writer, rebuild, selfcheck
from device_agent.bundle import Bundle, BundleError, InputSpec, load_bundle
from device_agent.device_models import DeviceModels
from device_agent.model_build import ModelBuildError, build_model, read_weights
from device_agent.nmoe_local import LocalNMoE, preprocess
from device_agent.rebuild import DeviceSpec, NewWeights, rebuild_bundle
from export.bundle_writer import DeviceModules, calibration_images
from toolkit.evaluate import ExpertOutputs, gate_router, nmoe_predict, predict
from toolkit.federated_data import FederatedData, raw_images
from toolkit.models import Expert, Extractor, Gate
from toolkit.torch_params import get_params, set_params

CLIENTS = 3
CALIBRATION = 64
RUN = "run-7"
ROUND = 12


def perturbed(weights: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """New weights as training would give them: every tensor moved a little."""
    rng = np.random.default_rng(seed)
    return {k: (v + 0.05 * np.abs(v).mean() * rng.standard_normal(v.shape)).astype(np.float32) for k, v in weights.items()}


def new_weights(modules: DeviceModules, seed: int) -> NewWeights:
    assert modules.gate is not None
    return NewWeights(perturbed(get_params(modules.extractor), seed), perturbed(get_params(modules.gate), seed + 1),
                      perturbed(get_params(modules.expert), seed + 2))


def torch_of(weights: NewWeights, modules: DeviceModules) -> DeviceModules:
    """Torch modules holding the new weights: the reference for the rebuilt files."""
    e, x = modules.extractor, modules.expert
    assert modules.gate is not None and weights.gate is not None
    gate = Gate(e.latent_dim, modules.gate.body[0].out_features, modules.gate.final.out_features)
    expert = Expert(e.latent_dim, x.net[0].out_features, x.net[2].out_features)
    return DeviceModules(set_params(Extractor(e.input_shape, e.features[0].out_channels, e.latent_dim),
                                    dict(weights.extractor)).eval(),
                         set_params(gate, dict(weights.gate)).eval(), set_params(expert, dict(weights.expert)).eval())


def own_images(data: FederatedData, c: int, spec: InputSpec, n: int = CALIBRATION) -> np.ndarray:
    return raw_images(calibration_images(data.train[c].x, n, 100 + c), spec)


@dataclass(frozen=True)
class Rebuilt:
    path: Path
    before: dict[int, Bundle]  # the exported bundles, loaded before the rebuild (their files are gone)
    before_samples: dict[int, dict[str, np.ndarray]]
    bundles: dict[int, Bundle]
    weights: dict[int, NewWeights]
    calibrations: list[tuple[int, str, np.ndarray]]
    seconds: list[float]


@pytest.fixture(scope="module")
def rebuilt(onnx_tflite_bundles: Path, modules: list[DeviceModules], data: FederatedData,
            tmp_path_factory: pytest.TempPathFactory) -> Rebuilt:
    """The tiny run's three exported bundles (ONNX + LiteRT), each rebuilt in place with new weights."""
    out = tmp_path_factory.mktemp("rebuilt")
    calls, seconds = [], []
    real = rebuild.quantize_int8

    def spy(fp32: Path, path: Path, input_name: str, calibration: np.ndarray) -> None:
        calls.append((int(path.parent.name.split(".")[1].split("-")[1]), path.name.split(".")[0], calibration.copy()))
        real(fp32, path, input_name, calibration)

    before, before_samples, bundles, weights = {}, {}, {}, {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rebuild, "quantize_int8", spy)
        for c in range(CLIENTS):
            before[c] = load_bundle(shutil.copytree(onnx_tflite_bundles / f"device-{c}", out / f"device-{c}"))
            before_samples[c] = before[c].samples()
            weights[c] = new_weights(modules[c], 10 * c)
            start = time.perf_counter()
            bundles[c] = rebuild_bundle(before[c].path, before[c], weights[c],
                                        own_images(data, c, before[c].manifest.input),
                                        model_version="fleet-v2", run_id=RUN, round_index=ROUND)
            seconds.append(time.perf_counter() - start)
    return Rebuilt(out, before, before_samples, bundles, weights, calls, seconds)


def test_manifest_says_what_was_rebuilt(rebuilt: Rebuilt) -> None:
    for c, bundle in rebuilt.bundles.items():
        m, old = bundle.manifest, rebuilt.before[c].manifest
        assert (m.schema_version, m.model_version) == (2, "fleet-v2")
        assert (m.device_id, m.expert_id, m.num_experts, m.top_k, m.latent_dim, m.class_names, m.routing, m.input) == (
            old.device_id, old.expert_id, old.num_experts, old.top_k, old.latent_dim, old.class_names, old.routing,
            old.input)
        p = m.provenance
        assert (p["built_by"], p["run_id"], p["round"], p["dropped_formats"]) == ("device", RUN, ROUND, ["tflite"])
        assert p["previous_model_version"] == old.model_version == old.provenance["config_hash"]
        assert set(p["packages"]) == {"nmoe-edge", "numpy", "onnx", "onnxruntime"} and "torch" not in p["packages"]
        assert {(e.role, e.format, e.precision) for e in m.models} == {
            (r, "onnx", p) for r in ("extractor", "gate", "expert") for p in ("fp32", "int8")}
        assert [(e.inputs, e.outputs) for e in m.models] == [
            (o.inputs, o.outputs) for o in (old.models) if o.format == "onnx"]  # same I/O: the agent is unchanged
        on_disk = sorted(f.name for f in bundle.path.iterdir())
        assert on_disk == sorted([e.file for e in m.models] + ["manifest.json", "samples.npz"])  # no stale .tflite
        assert all(e.sha256 != bundle.model(e.role, e.precision).sha256 for e in old.models if e.format == "onnx")
    assert sorted(p.name for p in rebuilt.path.iterdir()) == [f"device-{c}" for c in range(CLIENTS)]  # no scratch


def test_rebuilt_files_match_torch_with_the_new_weights(rebuilt: Rebuilt, modules: list[DeviceModules],
                                                        data: FederatedData) -> None:
    for c, bundle in rebuilt.bundles.items():
        ref = torch_of(rebuilt.weights[c], modules[c])
        assert ref.gate is not None
        x = data.personal_test[c].x
        z = predict(ref.extractor, x)
        models = DeviceModels.open(bundle, "fp32")
        assert models.gate is not None
        assert np.abs(models.extractor.run(x.numpy()) - z.numpy()).max() < 1e-5
        assert np.abs(models.gate.run(z.numpy()) - predict(ref.gate, z).numpy()).max() < 1e-5
        assert np.abs(models.expert.run(z.numpy()) - predict(ref.expert, z).numpy()).max() < 1e-5
        samples = bundle.samples()
        assert np.array_equal(samples["images"], rebuilt.before_samples[c]["images"])
        assert np.array_equal(samples["labels"], rebuilt.before_samples[c]["labels"])
        assert np.abs(samples["latent"] - predict(ref.extractor, torch.from_numpy(
            preprocess(samples["images"], bundle.manifest.input))).numpy()).max() < 1e-5


def test_local_nmoe_on_rebuilt_bundles_equals_torch_and_int8_agrees(rebuilt: Rebuilt, modules: list[DeviceModules],
                                                                   data: FederatedData) -> None:
    refs = [torch_of(rebuilt.weights[c], modules[c]) for c in range(CLIENTS)]
    fp32, int8 = LocalNMoE(rebuilt.bundles, "fp32"), LocalNMoE(rebuilt.bundles, "int8")
    same = total = 0
    for c in range(CLIENTS):
        test = data.personal_test[c]
        images = raw_images(test.x, rebuilt.bundles[c].manifest.input)
        got, quantized = fp32.predict(c, images), int8.predict(c, images)
        z = predict(refs[c].extractor, test.x)
        probs = torch.stack([torch.softmax(predict(r.expert, z), dim=-1) for r in refs], dim=1)
        gate = refs[c].gate
        assert gate is not None
        want, _ = nmoe_predict(gate_router(gate, 2), ExpertOutputs(z, probs))
        assert np.array_equal(got.labels, want.argmax(dim=1).numpy()) and np.abs(got.probs - want.numpy()).max() < 1e-4
        same, total = same + int(np.sum(quantized.labels == got.labels)), total + len(images)
        models = DeviceModels.open(rebuilt.bundles[c], "int8")
        assert models.gate is not None and models.expert.run(z.numpy()).shape == (len(images), 10)
    assert total == 300 and same / total >= 0.99, (same, total)


def test_int8_calibrates_on_the_devices_own_images_and_latents(rebuilt: Rebuilt, data: FederatedData) -> None:
    assert sorted((c, r) for c, r, _ in rebuilt.calibrations) == sorted(
        (c, r) for c in range(CLIENTS) for r in ("extractor", "gate", "expert"))
    for c, role, calibration in rebuilt.calibrations:
        spec = rebuilt.bundles[c].manifest.input
        x = preprocess(own_images(data, c, spec), spec)
        expected = x if role == "extractor" else DeviceModels.open(rebuilt.bundles[c]).extractor.run(x)
        assert np.abs(calibration - expected).max() < 1e-5, (c, role)


def test_selfcheck_passes_on_rebuilt_bundles(rebuilt: Rebuilt, capsys: pytest.CaptureFixture[str]) -> None:
    assert selfcheck.main([str(b.path) for b in rebuilt.bundles.values()]) == 0
    assert "ok: every fp32 model within" in capsys.readouterr().out


def test_rebuild_seconds(rebuilt: Rebuilt) -> None:
    """Generous bound (2 loaded cores): a tiny device rebuilds in well under a second when idle."""
    assert max(rebuilt.seconds) < 60, rebuilt.seconds


# ---- refusals: the previous bundle stays --------------------------------------------------------------------

def snapshot(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


@pytest.fixture
def device0(bundles_copy: Path) -> Bundle:
    return load_bundle(bundles_copy / "device-0")


def _rebuild(bundle: Bundle, weights: NewWeights, images: np.ndarray | None = None, **kw: object) -> Bundle:
    images = bundle.samples()["images"] if images is None else images
    options = {"model_version": "v9", "run_id": RUN, "round_index": 1, **kw}
    return rebuild_bundle(bundle.path, bundle, weights, images, **options)  # type: ignore[arg-type]


def exported_weights(bundle: Bundle) -> NewWeights:
    def of(role: str) -> dict[str, np.ndarray]:
        return read_weights(onnx.load_from_string(bundle.model_bytes(bundle.model(role, "fp32"))), role)
    return NewWeights(of("extractor"), of("gate"), of("expert"))


def assert_unchanged(bundle: Bundle, before: dict[str, bytes]) -> None:
    assert snapshot(bundle.path) == before
    assert sorted(p.name for p in bundle.path.parent.iterdir()) == [f"device-{c}" for c in range(CLIENTS)]
    load_bundle(bundle.path)


def test_a_corrupted_new_file_is_refused_and_the_old_bundle_kept(device0: Bundle,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    before = snapshot(device0.path)
    real = bundle_writer.load_bundle

    def corrupting(path: Path) -> Bundle:  # a bit flips on disk between writing and verifying
        target = Path(path) / "expert.int8.onnx"
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x10
        target.write_bytes(bytes(data))
        return real(path)

    monkeypatch.setattr(bundle_writer, "load_bundle", corrupting)
    with pytest.raises(BundleError, match=r"\.device-0\.partial/expert\.int8\.onnx: sha256 .* does not match"):
        _rebuild(device0, exported_weights(device0))
    assert_unchanged(device0, before)


def test_a_model_that_does_not_reproduce_its_samples_is_refused(device0: Bundle,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong file with a consistent hash (e.g. a builder bug): the self-check before the swap refuses it."""
    before = snapshot(device0.path)
    weights = exported_weights(device0)
    real = rebuild._write_role

    def wrong_expert(built: rebuild._Built, precisions: list[str], folder: Path) -> list:
        files = real(built, precisions, folder)
        if built.role == "expert":
            other = {k: v * 2 for k, v in weights.expert.items()}
            (folder / "expert.fp32.onnx").write_bytes(build_model("expert", other).SerializeToString())
        return files

    monkeypatch.setattr(rebuild, "_write_role", wrong_expert)
    with pytest.raises(BundleError, match=r"rebuilt expert fp32 does not reproduce its samples"):
        _rebuild(device0, weights)
    assert_unchanged(device0, before)


def _bad(weights: NewWeights, role: str, name: str, value: np.ndarray) -> NewWeights:
    changed = {"extractor": dict(weights.extractor), "gate": dict(weights.gate or {}), "expert": dict(weights.expert)}
    changed[role][name] = value
    return NewWeights(changed["extractor"], changed["gate"], changed["expert"])


@pytest.mark.parametrize("change, message", [
    (lambda w: _bad(w, "gate", "final.weight", np.full((3, 8), np.inf, np.float32)), r"final\.weight: has NaN or inf"),
    (lambda w: _bad(_bad(w, "expert", "net.2.weight", np.zeros((4, 16), np.float32)), "expert", "net.2.bias",
                    np.zeros(4, np.float32)), r"expert weights: output size 4, the device needs 10"),
    (lambda w: _bad(_bad(w, "gate", "final.weight", np.zeros((5, 8), np.float32)), "gate", "final.bias",
                    np.zeros(5, np.float32)), r"gate weights: output size 5, the device needs 3"),
    (lambda w: _bad(_bad(w, "gate", "body.0.weight", np.zeros((8, 12), np.float32)), "gate", "body.0.bias",
                    np.zeros(8, np.float32)), r"gate weights: input size 12, the device needs 16"),
    (lambda w: NewWeights(w.extractor, None, w.expert), r"routing 'gate' needs a gate, weights have none"),
])
def test_unusable_weights_are_refused_before_writing(device0: Bundle, change: object, message: str) -> None:
    before = snapshot(device0.path)
    with pytest.raises(ModelBuildError, match=message):
        _rebuild(device0, change(exported_weights(device0)))  # type: ignore[operator]
    assert_unchanged(device0, before)


@pytest.mark.parametrize("kw, message", [
    ({"images": np.zeros((4, 1, 16, 16), np.float32)}, r"calibration_images: expected uint8 images \[N, 1, 16, 16\]"),
    ({"images": np.zeros((0, 1, 16, 16), np.uint8)}, r"calibration_images: no images"),
    ({"sample_images": np.zeros((2, 1, 8, 8), np.uint8), "sample_labels": np.array([0, 1])},
     r"sample_images: expected uint8 images"),
    ({"sample_images": np.zeros((2, 1, 16, 16), np.uint8)}, r"give both sample_images and sample_labels"),
    ({"sample_images": np.zeros((2, 1, 16, 16), np.uint8), "sample_labels": np.array([0.5, 1])},
     r"sample_labels must be 2 integer class ids"),
    ({"precisions": ("fp16",)}, r"precisions must be a non-empty subset of fp32, int8"),
])
def test_unusable_inputs_are_refused(device0: Bundle, kw: dict, message: str) -> None:
    before = snapshot(device0.path)
    with pytest.raises(ModelBuildError, match=message):
        _rebuild(device0, exported_weights(device0), **kw)
    assert_unchanged(device0, before)


def test_a_bad_model_version_is_refused_by_the_loader(device0: Bundle) -> None:
    before = snapshot(device0.path)
    with pytest.raises(BundleError, match=r"model_version: must be 1\.\.255 bytes"):
        _rebuild(device0, exported_weights(device0), model_version="v" * 256)
    assert_unchanged(device0, before)


def test_only_int8_can_be_rebuilt(device0: Bundle) -> None:
    bundle = _rebuild(device0, exported_weights(device0), precisions=("int8",))
    assert {(e.precision, e.file) for e in bundle.manifest.models} == {
        ("int8", f"{r}.int8.onnx") for r in ("extractor", "gate", "expert")}
    assert sorted(f.name for f in bundle.path.iterdir()) == sorted(
        [f"{r}.int8.onnx" for r in ("extractor", "gate", "expert")] + ["manifest.json", "samples.npz"])
    assert DeviceModels.open(bundle, "int8").extractor.run(np.zeros((2, 1, 16, 16), np.float32)).shape == (2, 16)


def test_from_scratch_with_random_routing(device0: Bundle, tmp_path: Path) -> None:
    m = device0.manifest
    spec = DeviceSpec("pi-9", 2, m.num_experts, 1, m.class_names, "random", m.input)
    weights = exported_weights(device0)
    samples = device0.samples()
    images = samples["images"]
    with pytest.raises(ModelBuildError, match=r"sample_images and sample_labels are needed"):
        rebuild_bundle(tmp_path / "pi-9", spec, NewWeights(weights.extractor, None, weights.expert), images,
                       model_version="v1", run_id=RUN, round_index=0)
    with pytest.raises(ModelBuildError, match=r"routing 'random' needs no gate, weights have one"):
        rebuild_bundle(tmp_path / "pi-9", spec, weights, images, model_version="v1", run_id=RUN, round_index=0,
                       sample_images=images[:3], sample_labels=samples["labels"][:3])
    bundle = rebuild_bundle(tmp_path / "pi-9", spec, NewWeights(weights.extractor, None, weights.expert), images,
                            model_version="v1", run_id=RUN, round_index=0, sample_images=images[:3],
                            sample_labels=samples["labels"][:3], provenance={"config_hash": "c0ffee"})
    m2 = load_bundle(tmp_path / "pi-9").manifest
    assert (m2.device_id, m2.expert_id, m2.top_k, m2.routing, m2.model_version) == ("pi-9", 2, 1, "random", "v1")
    assert m2.provenance["previous_model_version"] is None and m2.provenance["dropped_formats"] == []
    assert m2.provenance["config_hash"] == "c0ffee"
    assert set(bundle.samples()) == {"images", "labels", "latent", "expert_probs"}
    models = DeviceModels.open(bundle, "int8")
    assert models.gate is None
    out = models.extractor.run(preprocess(images[:3], m.input))
    assert np.abs(out - bundle.samples()["latent"]).max() < 0.5


def test_an_interrupted_swap_is_undone(device0: Bundle) -> None:
    before = snapshot(device0.path)
    old = device0.path.with_name(".device-0.old")
    device0.path.rename(old)  # killed between the swap's two renames
    bundle_writer.restore_interrupted(device0.path)
    assert snapshot(device0.path) == before and not old.exists()
    device0.path.rename(old)
    base = load_bundle(old)
    bundle = rebuild_bundle(device0.path, base, exported_weights(base), base.samples()["images"], model_version="v9",
                            run_id=RUN, round_index=1)  # the next write restores the old folder, then replaces it
    assert bundle.manifest.model_version == "v9" and bundle.manifest.provenance["previous_model_version"] == (
        device0.manifest.model_version)
    assert sorted(p.name for p in device0.path.parent.iterdir()) == [f"device-{c}" for c in range(CLIENTS)]
