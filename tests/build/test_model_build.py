"""ONNX graphs from named weights (device_agent.model_build) against torch and torch's ONNX export."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from device_agent.bundle import Bundle, load_bundle
from device_agent.model_build import (
    IO_NAMES,
    IR_VERSION,
    OPSET,
    PARAMETERS,
    ModelBuildError,
    build_model,
    read_weights,
    tensor_specs,
)
from export.bundle_writer import DeviceModules, ModelSource
from export.onnx_export import export_fp32
from toolkit.evaluate import predict
from toolkit.federated_data import FederatedData
from toolkit.models import Expert, Extractor, Gate
from toolkit.torch_params import get_params

ROLES = ("extractor", "gate", "expert")
# (input shape, width, latent, gate hidden, expert hidden, experts, classes): quick config, tiny config, odd sizes
SIZES = [((1, 28, 28), 16, 64, 64, 128, 10, 10), ((1, 16, 16), 8, 16, 8, 16, 3, 10), ((3, 17, 13), 4, 8, 5, 7, 4, 3)]


def torch_models(size: tuple, seed: int) -> dict[str, nn.Module]:
    shape, width, latent, gate_hidden, expert_hidden, experts, classes = size
    torch.manual_seed(seed)
    return {"extractor": Extractor(shape, width, latent).eval(), "gate": Gate(latent, gate_hidden, experts).eval(),
            "expert": Expert(latent, expert_hidden, classes).eval()}


def inputs(role: str, size: tuple, n: int, seed: int = 1) -> np.ndarray:
    shape = size[0] if role == "extractor" else (size[2],)
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def run(model: onnx.ModelProto | bytes, x: np.ndarray) -> np.ndarray:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def weights_of(module: nn.Module) -> dict[str, np.ndarray]:
    return get_params(module)


@pytest.mark.parametrize("size", SIZES, ids=["quick", "tiny", "odd"])
def test_random_weights_match_torch(size: tuple) -> None:
    for seed in (0, 1):
        for role, module in torch_models(size, seed).items():
            model = build_model(role, weights_of(module), size[0])
            for n in (1, 7):  # the batch dimension is dynamic
                x = inputs(role, size, n)
                diff = np.abs(run(model, x) - predict(module, torch.from_numpy(x)).numpy()).max()
                assert diff < 1e-5, (role, seed, n, diff)


@pytest.mark.parametrize("size", SIZES[1:], ids=["tiny", "odd"])
def test_random_weights_match_torch_onnx_export(size: tuple, tmp_path: Path) -> None:
    """Same outputs, I/O, opset and IR version as the file `nmoe export` writes from the same module."""
    for role, module in torch_models(size, 2).items():
        x = inputs(role, size, 9)
        path = tmp_path / f"{role}.onnx"
        export_fp32(ModelSource(role, module, *IO_NAMES[role], x), path)
        exported, built = onnx.load(str(path)), build_model(role, weights_of(module), size[0])
        assert np.abs(run(built, x) - run(exported, x)).max() < 1e-6, role
        assert tensor_specs(built) == tensor_specs(exported)
        assert (built.ir_version, [(o.domain, o.version) for o in built.opset_import]) == (
            exported.ir_version, [(o.domain, o.version) for o in exported.opset_import]) == (IR_VERSION, [("", OPSET)])


def test_trained_weights_match_exported_files_and_torch(onnx_tflite_bundles: Path, modules: list[DeviceModules],
                                                        data: FederatedData) -> None:
    """The tiny run's trained models: weights read back from the exported files rebuild the same graphs."""
    for c, bundle in enumerate(load_bundle(p) for p in sorted(onnx_tflite_bundles.glob("device-*"))):
        x = data.personal_test[c].x
        z = predict(modules[c].extractor, x)
        for role, module, inp in [("extractor", modules[c].extractor, x), ("gate", modules[c].gate, z),
                                  ("expert", modules[c].expert, z)]:
            assert module is not None
            exported = bundle.model_bytes(bundle.model(role, "fp32"))
            weights = read_weights(onnx.load_from_string(exported), role)
            assert weights.keys() == module.state_dict().keys() and all(
                np.array_equal(weights[k], v.numpy()) for k, v in module.state_dict().items())
            built = build_model(role, weights, bundle.manifest.input.shape)
            assert tensor_specs(built) == _specs(bundle, role)
            got = run(built, inp.numpy())
            assert np.abs(got - run(exported, inp.numpy())).max() < 1e-6, (c, role)
            assert np.abs(got - predict(module, inp).numpy()).max() < 1e-5, (c, role)


def _specs(bundle: Bundle, role: str) -> tuple[list, list]:
    entry = bundle.model(role, "fp32")
    return entry.inputs, entry.outputs


def test_built_graph_is_named_after_torch_layers() -> None:
    model = build_model("extractor", weights_of(torch_models(SIZES[1], 0)["extractor"]), SIZES[1][0])
    assert [(n.op_type, n.name) for n in model.graph.node] == [
        ("Conv", "features.0"), ("Relu", "features.1"), ("Conv", "features.2"), ("Relu", "features.3"),
        ("Conv", "features.4"), ("Relu", "features.5"), ("Flatten", "features.6"), ("Gemm", "project")]
    assert [t.name for t in model.graph.initializer] == list(PARAMETERS["extractor"])


def test_read_weights_needs_every_parameter() -> None:
    gate = build_model("gate", weights_of(torch_models(SIZES[1], 0)["gate"]))
    with pytest.raises(ModelBuildError, match=r"expert: the model has no initializer net\.0\.weight, net\.0\.bias"):
        read_weights(gate, "expert")


def _tiny() -> dict[str, dict[str, np.ndarray]]:
    return {role: weights_of(m) for role, m in torch_models(SIZES[1], 0).items()}


def _change(role: str, name: str, value: object) -> tuple[str, dict]:
    weights = dict(_tiny()[role])
    if value is None:
        del weights[name]
    else:
        weights[name] = value
    return role, weights


@pytest.mark.parametrize("case, message", [
    (_change("gate", "final.bias", None), r"gate: weights missing \['final\.bias'\], unexpected none"),
    (_change("expert", "net.1.weight", np.zeros(3, np.float32)), r"unexpected \['net\.1\.weight'\]"),
    (_change("expert", "net.2.bias", np.zeros(10, np.int64)), r"net\.2\.bias: expected floating-point values"),
    (_change("gate", "body.0.weight", np.full((8, 16), np.nan, np.float32)), r"body\.0\.weight: has NaN"),
    (_change("expert", "net.2.weight", np.zeros((10, 15), np.float32)), r"net\.2\.weight: shape \[10, 15\], expected \[n, 16\]"),
    (_change("expert", "net.0.bias", np.zeros(15, np.float32)), r"net\.0\.bias: shape \[15\], expected \[16\]"),
    (_change("extractor", "features.2.weight", np.zeros((16, 7, 3, 3), np.float32)),
     r"features\.2\.weight: shape \[16, 7, 3, 3\], expected \[n, 8, 3, 3\]"),
    (_change("extractor", "features.0.weight", np.zeros((8, 1, 5, 5), np.float32)), r"expected \[n, 1, 3, 3\]"),
    (_change("extractor", "project.weight", np.zeros((16, 64), np.float32)),
     r"project\.weight: shape \[16, 64\], expected \[n, 128\]"),
])
def test_unusable_weights_are_refused_by_name(case: tuple[str, dict], message: str) -> None:
    role, weights = case
    with pytest.raises(ModelBuildError, match=message):
        build_model(role, weights, SIZES[1][0])


def test_extractor_needs_the_image_shape_and_roles_are_known() -> None:
    with pytest.raises(ModelBuildError, match=r"extractor: input_shape must be \[C, H, W\], got None"):
        build_model("extractor", _tiny()["extractor"])
    with pytest.raises(ModelBuildError, match=r"extractor: input_shape must be \[C, H, W\], got \[16, 16\]"):
        build_model("extractor", _tiny()["extractor"], [16, 16])
    with pytest.raises(ModelBuildError, match=r"features\.0\.weight: shape \[8, 1, 3, 3\], expected \[n, 2, 3, 3\]"):
        build_model("extractor", _tiny()["extractor"], [2, 16, 16])
    with pytest.raises(ModelBuildError, match="unknown role 'head'"):
        build_model("head", _tiny()["expert"])


def test_float64_weights_are_stored_as_float32() -> None:
    weights = {k: v.astype(np.float64) for k, v in _tiny()["expert"].items()}
    model = build_model("expert", weights)
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in model.graph.initializer)
    assert tensor_specs(model)[1][0].dtype == "float32"
