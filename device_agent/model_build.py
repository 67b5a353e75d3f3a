"""ONNX graphs of a device's models from named weights, without torch.

After federated training a device holds new weights as named numpy arrays (the torch state-dict
names of toolkit/models.py) and rebuilds its inference files from them. The graphs have the
layers of `toolkit.models` (extractor: three stride-2 3x3 Conv + Relu, Flatten, Gemm; gate and
expert: Gemm, Relu, Gemm) and the I/O of the files `nmoe export` writes (names, float32, a dynamic
"batch" dimension, opset 18), so a manifest's I/O specs and the agent's runtimes stay the same.
Layer sizes come from the weight shapes; the extractor also needs the image shape [C, H, W].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from device_agent.bundle import ROLES, TensorSpec

OPSET = 18  # what `nmoe export` writes (torch's dynamo exporter minimum); ORT >= 1.14 runs it
IR_VERSION = 10  # the IR version of those files, readable by older runtimes than onnx's default
BATCH = "batch"
IO_NAMES = {"extractor": ("x", "latent"), "gate": ("z", "gate_logits"), "expert": ("z", "logits"),
            "shared_expert": ("z", "logits")}
CONVS = ("features.0", "features.2", "features.4")  # nn.Sequential indices; ReLUs at 1, 3, 5, Flatten at 6
LINEARS = {"extractor": ("project",), "gate": ("body.0", "final"), "expert": ("net.0", "net.2"),
           "shared_expert": ("net.0", "net.2")}  # the shared expert is an Expert
PARAMETERS = {role: tuple(f"{layer}.{p}" for layer in (CONVS if role == "extractor" else ()) + LINEARS[role]
                          for p in ("weight", "bias")) for role in ROLES}

Weights = Mapping[str, np.ndarray]


class ModelBuildError(ValueError):
    """Weights that do not make the role's model (message names the weight)."""


def build_model(role: str, weights: Weights, input_shape: Sequence[int] | None = None) -> onnx.ModelProto:
    """The role's ONNX model with these weights; `input_shape` [C, H, W] is required for the extractor.

    Refuses (ModelBuildError) missing or unexpected names, non-float or non-finite values and
    shapes that do not chain; the result passes onnx.checker's full check.
    """
    if role not in ROLES:
        raise ModelBuildError(f"unknown role {role!r} (choose from {', '.join(ROLES)})")
    _check_names(role, weights)
    arrays = {name: _float32(name, weights[name]) for name in PARAMETERS[role]}
    if role == "extractor":
        if input_shape is None or len(input_shape) != 3 or min(input_shape) < 1:
            raise ModelBuildError(f"extractor: input_shape must be [C, H, W], got {input_shape}")
        nodes, in_shape, out_dim = _extractor(arrays, [int(d) for d in input_shape])
    else:
        nodes, in_shape, out_dim = _mlp(role, arrays)
    in_name, out_name = IO_NAMES[role]
    graph = helper.make_graph(
        nodes, role,
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, [BATCH, *in_shape])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [BATCH, out_dim])],
        initializer=[numpy_helper.from_array(a, name) for name, a in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="nmoe-edge device_agent.model_build")
    onnx.checker.check_model(model, full_check=True)
    return model


def read_weights(model: onnx.ModelProto, role: str) -> dict[str, np.ndarray]:
    """The role's named weights in an ONNX file of it (built here or exported from torch, fp32)."""
    found = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in PARAMETERS[role]}
    missing = [n for n in PARAMETERS[role] if n not in found]
    if missing:
        raise ModelBuildError(f"{role}: the model has no initializer {', '.join(missing)} (not an fp32 {role} file)")
    return {name: found[name] for name in PARAMETERS[role]}


def tensor_specs(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs and outputs (a symbolic dimension stays a string, e.g. "batch")."""
    weights = {t.name for t in model.graph.initializer}

    def spec(v: onnx.ValueInfoProto) -> TensorSpec:
        t = v.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name
        return TensorSpec(v.name, [d.dim_param or d.dim_value for d in t.shape.dim], dtype)

    return ([spec(v) for v in model.graph.input if v.name not in weights],
            [spec(v) for v in model.graph.output])


def _check_names(role: str, weights: Weights) -> None:
    expected = PARAMETERS[role]
    missing = [n for n in expected if n not in weights]
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ModelBuildError(f"{role}: weights missing {missing or 'none'}, unexpected {unexpected or 'none'} "
                              f"(expected {', '.join(expected)})")


def _float32(name: str, value: np.ndarray) -> np.ndarray:
    a = np.asarray(value)
    if a.dtype.kind != "f":
        raise ModelBuildError(f"{name}: expected floating-point values, got {a.dtype}")
    if not np.isfinite(a).all():
        raise ModelBuildError(f"{name}: has NaN or infinite values")
    return np.ascontiguousarray(a, dtype=np.float32)


def _shape(arrays: Mapping[str, np.ndarray], name: str, expected: Sequence[int | None]) -> tuple[int, ...]:
    """arrays[name].shape, checked against `expected` (None: any size)."""
    shape = arrays[name].shape
    if len(shape) != len(expected) or any(e is not None and s != e for s, e in zip(shape, expected, strict=True)):
        want = ", ".join("n" if e is None else str(e) for e in expected)
        raise ModelBuildError(f"{name}: shape {list(shape)}, expected [{want}]")
    return tuple(shape)


def _gemm(arrays: Mapping[str, np.ndarray], layer: str, x: str, y: str, in_dim: int | None) -> tuple[onnx.NodeProto, int, int]:
    """torch Linear as Gemm(x, W, b, transB=1): the node, its input and output sizes."""
    out_dim, in_dim = _shape(arrays, f"{layer}.weight", [None, in_dim])
    _shape(arrays, f"{layer}.bias", [out_dim])
    node = helper.make_node("Gemm", [x, f"{layer}.weight", f"{layer}.bias"], [y], name=layer,
                            alpha=1.0, beta=1.0, transA=0, transB=1)
    return node, in_dim, out_dim


def _extractor(arrays: Mapping[str, np.ndarray], input_shape: list[int]) -> tuple[list[onnx.NodeProto], list[int], int]:
    channels, height, width = input_shape
    nodes, x = [], IO_NAMES["extractor"][0]
    for i, layer in enumerate(CONVS):
        out_channels = _shape(arrays, f"{layer}.weight", [None, channels, 3, 3])[0]
        _shape(arrays, f"{layer}.bias", [out_channels])
        relu = f"features.{2 * i + 1}"
        nodes += [helper.make_node("Conv", [x, f"{layer}.weight", f"{layer}.bias"], [layer], name=layer,
                                   kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], dilations=[1, 1], group=1),
                  helper.make_node("Relu", [layer], [relu], name=relu)]
        x, channels = relu, out_channels
        height, width = (height - 1) // 2 + 1, (width - 1) // 2 + 1  # 3x3, stride 2, padding 1
    nodes.append(helper.make_node("Flatten", [x], ["features.6"], name="features.6", axis=1))
    gemm, _, latent_dim = _gemm(arrays, "project", "features.6", IO_NAMES["extractor"][1], channels * height * width)
    return [*nodes, gemm], input_shape, latent_dim


def _mlp(role: str, arrays: Mapping[str, np.ndarray]) -> tuple[list[onnx.NodeProto], list[int], int]:
    (first, second), (x, y) = LINEARS[role], IO_NAMES[role]
    hidden_gemm, in_dim, hidden = _gemm(arrays, first, x, first, None)
    relu = f"{first.partition('.')[0]}.1"  # body.1 / net.1, as in toolkit.models
    out_gemm, _, out_dim = _gemm(arrays, second, relu, y, hidden)
    return [hidden_gemm, helper.make_node("Relu", [first], [relu], name=relu), out_gemm], [in_dim], out_dim
