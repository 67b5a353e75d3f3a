"""Bundle loading: every broken bundle is one BundleError naming the file, and nothing gets loaded.

Bundles here are written by the real writer with a stand-in format (tiny hand-made ONNX graphs),
so these tests take milliseconds.
"""

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

from device_agent.bundle import (
    SCHEMA_VERSION,
    SHARED_EXPERT_SCHEMA_VERSION,
    BundleError,
    InputSpec,
    Manifest,
    Quantization,
    SharedExpert,
    TensorSpec,
    load_bundle,
)
from device_agent.ood_score import OODScore
from device_agent.runtime import (
    UnsupportedFormat,
    dequantize,
    from_model_output,
    open_runtime,
    to_model_input,
)
from export.bundle_writer import ExportError, ModelSource, WrittenModel, write_bundle

SHAPES = {"extractor": ["batch", 1, 2, 2], "gate": ["batch", 4], "expert": ["batch", 4], "shared_expert": ["batch", 4]}
IO = {"extractor": ("x", "latent"), "gate": ("z", "gate_logits"), "expert": ("z", "logits"),
      "shared_expert": ("z", "logits")}


class TinyOnnx:
    """Stand-in format: a Flatten (extractor) or Identity graph per role."""

    name = "onnx"

    def write(self, source: ModelSource, precisions: Sequence[str], out_dir: Path) -> list[WrittenModel]:
        shape = SHAPES[source.role]
        x = helper.make_tensor_value_info(source.input_name, TensorProto.FLOAT, shape)
        y = helper.make_tensor_value_info(source.output_name, TensorProto.FLOAT, ["batch", 4])
        op = "Flatten" if source.role == "extractor" else "Identity"
        graph = helper.make_graph([helper.make_node(op, [x.name], [y.name])], source.role, [x], [y])
        written = []
        for p in precisions:
            path = out_dir / f"{source.role}.{p}.onnx"
            onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
            written.append(WrittenModel(p, path, [TensorSpec(x.name, shape, "float32")],
                                        [TensorSpec(y.name, ["batch", 4], "float32")]))
        return written


def sources(roles: Sequence[str] = ("extractor", "gate", "expert")) -> list[ModelSource]:
    """Every role; TinyOnnx needs no torch module."""
    return [ModelSource(role, None, *IO[role], np.zeros((1, *SHAPES[role][1:]), np.float32))  # type: ignore[arg-type]
            for role in roles]


def tiny_bundle(dest: Path, shared: bool, ood: dict[str, np.ndarray] | None = None) -> Path:
    """A 4-expert (3 with a shared expert) tiny bundle: latent dim 4; with `ood`, in mode "fallback"."""
    manifest = Manifest(
        schema_version=SHARED_EXPERT_SCHEMA_VERSION if shared else SCHEMA_VERSION, model_version="m-1",
        device_id="device-1", expert_id=1, num_experts=3 if shared else 4, top_k=2, latent_dim=4,
        num_classes=4, class_names=["a", "b", "c", "d"], routing="gate",
        input=InputSpec([1, 2, 2], "uint8", 1 / 255, [0.5], [0.25], "NCHW"), models=[],
        provenance={"method": "test"}, samples=None,
        shared_expert=SharedExpert(3, True, "fallback" if ood else "routed") if shared else None)
    samples = {"images": np.arange(8, dtype=np.uint8).reshape(2, 1, 2, 2), "labels": np.array([0, 3])}
    roles = ("extractor", "gate", "expert") + (("shared_expert",) if shared else ())
    write_bundle(dest, manifest, sources(roles), [TinyOnnx()], ["fp32", "int8"], samples, ood)
    return dest


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    return tiny_bundle(tmp_path / "device-1", shared=False)


@pytest.fixture
def shared_dir(tmp_path: Path) -> Path:
    return tiny_bundle(tmp_path / "device-1", shared=True)


@pytest.fixture
def no_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any model gets loaded into ONNX Runtime."""
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)


def edit_manifest(bundle: Path, change: dict) -> None:
    path = bundle / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))


def test_valid_bundle_loads_and_runs(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    assert (m.device_id, m.expert_id, m.routing, len(m.models)) == ("device-1", 1, "gate", 6)
    entry = bundle.model("extractor", "int8")
    assert entry.file == "extractor.int8.onnx" and entry.inputs[0].shape == ["batch", 1, 2, 2]
    x = np.random.default_rng(0).random((3, 1, 2, 2), dtype=np.float32)
    assert np.array_equal(open_runtime(bundle, entry).run(x), x.reshape(3, 4))
    assert np.array_equal(bundle.samples()["labels"], [0, 3])
    assert m.to_dict() == json.loads((bundle_dir / "manifest.json").read_text())


def test_rewriting_replaces_the_old_bundle(bundle_dir: Path) -> None:
    (bundle_dir / "stale.onnx").write_bytes(b"old")
    manifest = load_bundle(bundle_dir).manifest
    write_bundle(bundle_dir, manifest, sources(), [TinyOnnx()], ["fp32"], {"labels": np.array([1])})
    assert not (bundle_dir / "stale.onnx").exists() and len(load_bundle(bundle_dir).manifest.models) == 3
    assert sorted(p.name for p in bundle_dir.parent.iterdir()) == ["device-1"]


def test_a_folder_that_is_not_a_bundle_is_not_replaced(tmp_path: Path) -> None:
    (tmp_path / "device-1").mkdir()
    (tmp_path / "device-1" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"device-1 exists and is not a bundle"):
        write_bundle(tmp_path / "device-1", None, sources(), [TinyOnnx()], ["fp32"], {})  # type: ignore[arg-type]
    assert (tmp_path / "device-1" / "notes.txt").read_text() == "mine"


def test_missing_model_lookup_names_what_exists(bundle_dir: Path) -> None:
    with pytest.raises(BundleError, match=r"no gate fp32 litert model \(has: extractor fp32 onnx"):
        load_bundle(bundle_dir).model("gate", "fp32", "litert")


def test_tampered_byte(bundle_dir: Path, no_sessions: None) -> None:
    path = bundle_dir / "gate.int8.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"gate\.int8\.onnx: sha256 .* does not match manifest\.json"):
        load_bundle(bundle_dir)


def test_truncated_file(bundle_dir: Path, no_sessions: None) -> None:
    path = bundle_dir / "extractor.fp32.onnx"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(BundleError, match=rf"extractor\.fp32\.onnx: {size - 10} bytes, manifest\.json says {size}"):
        load_bundle(bundle_dir)


def test_missing_file(bundle_dir: Path, no_sessions: None) -> None:
    (bundle_dir / "samples.npz").unlink()
    with pytest.raises(BundleError, match=r"samples\.npz: listed in manifest\.json but missing"):
        load_bundle(bundle_dir)


def test_unknown_schema_version(bundle_dir: Path, no_sessions: None) -> None:
    edit_manifest(bundle_dir, {"schema_version": 4})
    with pytest.raises(BundleError, match=r"manifest\.json: schema_version 4 is not supported .*schema_version 1, 2 and 3"):
        load_bundle(bundle_dir)


def test_schema_3_has_a_local_shared_expert_as_the_gates_last_output(shared_dir: Path) -> None:
    bundle = load_bundle(shared_dir)
    m = bundle.manifest
    assert (m.schema_version, m.shared_expert, m.num_experts, m.gate_outputs) == (3, SharedExpert(3, True), 3, 4)
    assert bundle.model("shared_expert", "int8").file == "shared_expert.int8.onnx"
    assert json.loads((shared_dir / "manifest.json").read_text())["shared_expert"] == {
        "index": 3, "local": True, "mode": "routed", "ood": None}
    assert m.to_dict() == json.loads((shared_dir / "manifest.json").read_text())


def test_schema_2_bundles_have_no_shared_expert_field(bundle_dir: Path) -> None:
    assert "shared_expert" not in json.loads((bundle_dir / "manifest.json").read_text())
    assert load_bundle(bundle_dir).manifest.gate_outputs == 4


@pytest.mark.parametrize("change, message", [
    ({"shared_expert": None}, r"shared_expert: expected an object"),
    ({"shared_expert": {"index": 2, "local": True, "mode": "routed"}}, r"shared_expert\.index: 2, must be num_experts=3"),
    ({"shared_expert": {"index": 3, "local": False, "mode": "routed"}}, r"shared_expert\.local: must be true"),
    ({"shared_expert": {"index": 3, "local": True}}, r"shared_expert\.mode: missing"),
    ({"shared_expert": {"index": 3, "local": True, "mode": "fallback"}}, r"shared_expert\.ood: mode 'fallback' needs an"),
    ({"shared_expert": {"index": 3, "local": True, "mode": "routed", "ood": {"file": "o.npz", "sha256": "0" * 64,
                                                                            "bytes": 1}}},
     r"shared_expert\.ood: mode 'routed' needs no OOD score file"),
    ({"shared_expert": {"index": 3, "local": True, "mode": "routed"}, "routing": "random"},
     r"shared_expert: needs routing \"gate\""),
    ({"schema_version": 2}, (r"models: onnx (fp32|int8) has roles \[.*'shared_expert'\], routing 'gate' needs "
                            r"\['expert', 'extractor', 'gate'\]")),
])
def test_schema_3_shared_expert_is_checked(shared_dir: Path, change: dict, message: str, no_sessions: None) -> None:
    edit_manifest(shared_dir, change)
    with pytest.raises(BundleError, match=rf"manifest\.json: {message}"):
        load_bundle(shared_dir)


def test_schema_3_needs_the_shared_expert_field_and_models(shared_dir: Path, no_sessions: None) -> None:
    manifest = json.loads((shared_dir / "manifest.json").read_text())
    del manifest["shared_expert"]
    (shared_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"manifest\.json: shared_expert: missing"):
        load_bundle(shared_dir)
    manifest["shared_expert"] = {"index": 3, "local": True, "mode": "routed"}
    manifest["models"] = [e for e in manifest["models"] if e["role"] != "shared_expert"]
    (shared_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"routing 'gate' needs \['expert', 'extractor', 'gate', 'shared_expert'\]"):
        load_bundle(shared_dir)


def test_schema_2_has_the_model_version(bundle_dir: Path) -> None:
    m = load_bundle(bundle_dir).manifest
    assert (m.schema_version, m.model_version) == (2, "m-1")


@pytest.mark.parametrize("provenance, version", [
    ({"config_hash": "ab" * 32, "method": "x"}, "ab" * 32),
    ({"method": "x"}, None),
    ({"config_hash": ""}, None),
    ({"config_hash": 7}, None),
])
def test_schema_1_is_read_with_the_config_hash_as_model_version(bundle_dir: Path, provenance: dict,
                                                                version: str | None) -> None:
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    del manifest["model_version"]
    (bundle_dir / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 1, "provenance": provenance}))
    m = load_bundle(bundle_dir).manifest
    assert (m.schema_version, m.model_version, m.provenance) == (1, version, provenance)


@pytest.mark.parametrize("change, message", [
    ({"model_version": None}, r"model_version: expected a string"),
    ({"model_version": ""}, r"model_version: must be 1\.\.255 bytes of UTF-8"),
    ({"model_version": "é" * 128}, r"model_version: must be 1\.\.255 bytes of UTF-8 .*got 128 characters"),
    ({"model_version": "\ud800"}, r"model_version: must be 1\.\.255 bytes of UTF-8"),
])
def test_schema_2_model_version_is_checked(bundle_dir: Path, change: dict, message: str, no_sessions: None) -> None:
    edit_manifest(bundle_dir, change)
    with pytest.raises(BundleError, match=rf"manifest\.json: {message}"):
        load_bundle(bundle_dir)


def test_schema_2_without_model_version_is_refused(bundle_dir: Path, no_sessions: None) -> None:
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    del manifest["model_version"]
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"manifest\.json: model_version: missing"):
        load_bundle(bundle_dir)


def ood_tensors(**change: np.ndarray) -> dict[str, np.ndarray]:
    means = np.array([[0, 0, 0, 0], [4, 0, 0, 0]], np.float32)
    return {"means": means, "precision": np.eye(4, dtype=np.float32), "tau": np.float64(4.0),
            "spread": np.float64(2.0), "temperature": np.float64(0.5), **change}


def test_fallback_mode_carries_a_verified_ood_score(tmp_path: Path) -> None:
    bundle = load_bundle(tiny_bundle(tmp_path / "device-1", shared=True, ood=ood_tensors()))
    shared = bundle.manifest.shared_expert
    assert shared is not None and (shared.mode, shared.ood.file) == ("fallback", "ood.npz")  # type: ignore[union-attr]
    assert bundle.manifest.gate_outputs == 3  # the gate routes over the fleet's experts only
    score = OODScore.of(bundle)
    z = np.array([[0, 0, 0, 0], [4, 2, 0, 0], [20, 0, 0, 0]], np.float32)  # distances 0, 4, 256
    np.testing.assert_allclose(score.distance(z), [0, 4, 256])
    np.testing.assert_allclose(score(z), [1 / (1 + np.exp(4)), 0.5, 1.0], rtol=1e-6)  # sigmoid((d - 4) / 1)
    (bundle.path / "ood.npz").write_bytes(b"changed")
    with pytest.raises(BundleError, match=r"ood\.npz: 7 bytes, manifest\.json says"):
        load_bundle(bundle.path)


@pytest.mark.parametrize("change, message", [
    ({"precision": np.eye(3, dtype=np.float32)}, r"ood\.npz: expected means \[K, 4\], precision \[4, 4\]"),
    ({"spread": np.float64(0)}, r"ood\.npz: not finite, or spread / temperature not > 0"),
    ({"tau": np.float64(np.nan)}, r"ood\.npz: not finite"),
])
def test_unusable_ood_scores_are_one_bundle_error(tmp_path: Path, change: dict, message: str) -> None:
    bundle = load_bundle(tiny_bundle(tmp_path / "device-1", shared=True, ood=ood_tensors(**change)))
    with pytest.raises(BundleError, match=message):
        OODScore.of(bundle)


def test_malformed_json(bundle_dir: Path, no_sessions: None) -> None:
    path = bundle_dir / "manifest.json"
    path.write_text(path.read_text()[:-20])
    with pytest.raises(BundleError, match=r"manifest\.json: not valid JSON"):
        load_bundle(bundle_dir)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"manifest\.json: cannot read"):
        load_bundle(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"top_k": 9}, r"top_k: 9 is more than num_experts=4"),
    ({"expert_id": True}, r"expert_id: expected an integer"),
    ({"class_names": ["a"]}, r"class_names: 1 names for num_classes=4"),
    ({"routing": "random"}, r"models: onnx (fp32|int8) has roles .*routing 'random' needs \['expert', 'extractor'\]"),
    ({"input": {"shape": [1, 2, 2], "dtype": "uint8", "scale": 1, "mean": [0], "std": [0], "layout": "NCHW"}},
     r"input: mean and std need 1 values each"),
    ({"models": [{"role": "extractor"}]}, r"models\[0\]\.format: missing"),
    ({"samples": {"file": "../secret.npz", "sha256": "0" * 64, "bytes": 1}}, r"samples\.file: '\.\./secret\.npz' is not a plain"),
])
def test_invalid_fields_name_the_key(bundle_dir: Path, change: dict, message: str, no_sessions: None) -> None:
    edit_manifest(bundle_dir, change)
    with pytest.raises(BundleError, match=rf"manifest\.json: {message}"):
        load_bundle(bundle_dir)


def test_duplicate_json_key_is_refused(bundle_dir: Path) -> None:
    path = bundle_dir / "manifest.json"
    path.write_text(path.read_text().replace('"top_k": 2,', '"top_k": 2, "top_k": 1,'))
    with pytest.raises(BundleError, match="duplicate key"):
        load_bundle(bundle_dir)


def test_file_changed_after_loading_is_not_run(bundle_dir: Path, no_sessions: None) -> None:
    bundle = load_bundle(bundle_dir)
    (bundle_dir / "expert.fp32.onnx").write_bytes(b"evil")
    with pytest.raises(BundleError, match=r"expert\.fp32\.onnx: changed since the bundle was loaded"):
        open_runtime(bundle, bundle.model("expert", "fp32"))


def test_unknown_format_names_supported_ones(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    entry = bundle.model("gate", "fp32")
    with pytest.raises(UnsupportedFormat, match=r"format 'coreml' is not supported by this agent "
                                                r"\(supported: executorch, onnx, tflite\)"):
        open_runtime(bundle, dataclasses.replace(entry, format="coreml"))


def test_int8_io_quantization_round_trip() -> None:
    q = Quantization(scale=0.05, zero_point=-3)
    spec = TensorSpec("z", ["batch", 3], "int8", q)
    x = np.array([[0.0, 1.0, -200.0]], dtype=np.float32)
    qx = to_model_input(x, spec)
    assert qx.dtype == np.int8 and qx.tolist() == [[-3, 17, -128]]  # saturates
    assert np.allclose(from_model_output(qx, spec), [[0.0, 1.0, -6.25]])
    assert dequantize(np.array([127], np.int8), q).dtype == np.float32
    assert from_model_output(qx, TensorSpec("z", [3], "float32")).dtype == np.float32
