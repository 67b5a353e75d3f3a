"""Inference runtimes for bundle models: float in, float out, whatever the file's own I/O types.

A runtime library is imported only when a model of its format is opened, so a device installs
just the one it uses. Integer model I/O (LiteRT int8) is quantized/dequantized here with the
manifest's parameters; ONNX QDQ models keep float I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from device_agent.bundle import Bundle, ModelEntry, Quantization, TensorSpec


class UnsupportedFormat(ValueError):
    """A model format this agent has no runtime for."""


class Runtime(Protocol):
    """One loaded model with a single input and a single output."""

    name: str

    def run(self, inputs: np.ndarray) -> np.ndarray:
        """float32 [batch, ...] in, float32 [batch, ...] out."""
        ...


def quantize(x: np.ndarray, q: Quantization, dtype: np.dtype) -> np.ndarray:
    """real -> integer: round(x / scale) + zero_point, saturated to dtype."""
    info = np.iinfo(dtype)
    return np.clip(np.rint(x / q.scale) + q.zero_point, info.min, info.max).astype(dtype)


def dequantize(x: np.ndarray, q: Quantization) -> np.ndarray:
    """integer -> real: (x - zero_point) * scale, float32."""
    return ((x.astype(np.float32) - q.zero_point) * q.scale).astype(np.float32)


def to_model_input(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """A float array in the model input's dtype (quantized when the spec carries parameters)."""
    if spec.quantization is not None:
        return quantize(x, spec.quantization, np.dtype(spec.dtype))
    return np.ascontiguousarray(x, dtype=spec.dtype)


def from_model_output(y: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """A model output as float32 (dequantized when the spec carries parameters)."""
    return y.astype(np.float32) if spec.quantization is None else dequantize(y, spec.quantization)


class OnnxRuntime:
    """ONNX Runtime on the CPU; the model bytes come verified from the bundle."""

    def __init__(self, model: bytes, entry: ModelEntry, intra_op_threads: int = 1) -> None:
        try:
            import onnxruntime as ort
        except ModuleNotFoundError:
            raise UnsupportedFormat("format 'onnx' needs onnxruntime: pip install onnxruntime "
                                    "(or nmoe-edge[agent])") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self._input, self._output = entry.inputs[0], entry.outputs[0]
        self.name = f"onnxruntime {ort.__version__} CPU, {intra_op_threads} thread(s): {entry.file}"

    def run(self, inputs: np.ndarray) -> np.ndarray:
        feed = {self._input.name: to_model_input(inputs, self._input)}
        return from_model_output(self._session.run([self._output.name], feed)[0], self._output)


RUNTIMES: dict[str, Callable[[bytes, ModelEntry, int], Runtime]] = {"onnx": OnnxRuntime}  # by manifest format


def open_runtime(bundle: Bundle, entry: ModelEntry, intra_op_threads: int = 1) -> Runtime:
    """Load one model of a verified bundle into the runtime for its format."""
    runtime = RUNTIMES.get(entry.format)
    if runtime is None:
        raise UnsupportedFormat(f"{bundle.path / entry.file}: format {entry.format!r} is not supported by "
                                f"this agent (supported: {', '.join(RUNTIMES)})")
    if len(entry.inputs) != 1 or len(entry.outputs) != 1:
        raise UnsupportedFormat(f"{bundle.path / entry.file}: expected one input and one output, manifest "
                                f"lists {len(entry.inputs)} and {len(entry.outputs)}")
    return runtime(bundle.model_bytes(entry), entry, intra_op_threads)
