"""Inference runtimes for bundle models: float in, float out, whatever the file's own I/O types.

A runtime library is imported only when a model of its format is opened, so a device installs
just the one it uses: onnxruntime ("onnx"), ai_edge_litert or tflite_runtime ("tflite"),
executorch ("executorch", whose Python bindings need torch). Integer model I/O (LiteRT int8) is
quantized/dequantized here with the manifest's parameters; ONNX QDQ and ExecuTorch int8 models keep
float I/O. A model exported with a static batch size is fed any batch in chunks of that size.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from device_agent.bundle import Bundle, BundleError, ModelEntry, Quantization, TensorSpec


class UnsupportedFormat(ValueError):
    """A model format this agent has no runtime for."""


class MissingRuntime(UnsupportedFormat):
    """A known format whose runtime library is not installed on this device (the message says which)."""


class Runtime(Protocol):
    """One loaded model with a single input and a single output."""

    name: str

    def run(self, inputs: np.ndarray) -> np.ndarray:
        """float32 [batch, ...] in, float32 [batch, ...] out."""
        ...


def quantize(x: np.ndarray, q: Quantization, dtype: np.dtype) -> np.ndarray:
    """real -> integer: round(x / scale) + zero_point, saturated to dtype."""
    info = np.iinfo(dtype)
    quantized: np.ndarray = np.clip(np.rint(x / q.scale) + q.zero_point, info.min, info.max).astype(dtype)
    return quantized


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
            raise MissingRuntime("format 'onnx' needs onnxruntime: pip install onnxruntime "
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


class TFLiteRuntime:
    """LiteRT interpreter: ai_edge_litert, or the older tflite_runtime where that is what a device has."""

    def __init__(self, model: bytes, entry: ModelEntry, intra_op_threads: int = 1) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
            library = "ai-edge-litert"
        except ModuleNotFoundError:
            try:
                from tflite_runtime.interpreter import Interpreter
                library = "tflite-runtime"
            except ModuleNotFoundError:
                raise MissingRuntime("format 'tflite' needs ai-edge-litert (pip install ai-edge-litert, or "
                                     "nmoe-edge[agent,tflite]) or tflite-runtime") from None
        self._interpreter = Interpreter(model_content=model, num_threads=intra_op_threads)
        self._interpreter.allocate_tensors()
        self._input_index = self._interpreter.get_input_details()[0]["index"]
        self._output_index = self._interpreter.get_output_details()[0]["index"]
        self._input, self._output = entry.inputs[0], entry.outputs[0]
        self.name = f"{library} CPU, {intra_op_threads} thread(s): {entry.file}"

    def run(self, inputs: np.ndarray) -> np.ndarray:
        self._interpreter.set_tensor(self._input_index, to_model_input(inputs, self._input))
        self._interpreter.invoke()
        return from_model_output(self._interpreter.get_tensor(self._output_index), self._output)


def _executorch(model: bytes, entry: ModelEntry, intra_op_threads: int) -> Runtime:
    from device_agent.executorch_runtime import ExecuTorchRuntime

    return ExecuTorchRuntime(model, entry, intra_op_threads)


class StaticBatch:
    """Runs a model exported for a fixed batch size B on any batch: chunks of B, the last one padded."""

    def __init__(self, runtime: Runtime, batch: int) -> None:
        self._runtime, self._batch = runtime, batch
        self.name = f"{runtime.name} (static batch {batch})"

    def run(self, inputs: np.ndarray) -> np.ndarray:
        n, b = len(inputs), self._batch
        if n == b:
            return self._runtime.run(inputs)
        padded = np.concatenate([inputs, np.zeros((-n % b, *inputs.shape[1:]), inputs.dtype)])
        outputs = [self._runtime.run(padded[i:i + b]) for i in range(0, len(padded), b)]
        return np.concatenate(outputs)[:n]


RUNTIMES: dict[str, Callable[[bytes, ModelEntry, int], Runtime]] = {  # by manifest format
    "onnx": OnnxRuntime, "tflite": TFLiteRuntime, "executorch": _executorch}


def open_runtime(bundle: Bundle, entry: ModelEntry, intra_op_threads: int = 1) -> Runtime:
    """Load one model of a verified bundle into the runtime for its format."""
    runtime = RUNTIMES.get(entry.format)
    if runtime is None:
        raise UnsupportedFormat(f"{bundle.path / entry.file}: format {entry.format!r} is not supported by "
                                f"this agent (supported: {', '.join(sorted(RUNTIMES))})")
    if len(entry.inputs) != 1 or len(entry.outputs) != 1:
        raise UnsupportedFormat(f"{bundle.path / entry.file}: expected one input and one output, manifest "
                                f"lists {len(entry.inputs)} and {len(entry.outputs)}")
    model = bundle.model_bytes(entry)
    try:
        loaded = runtime(model, entry, intra_op_threads)
    except (UnsupportedFormat, BundleError):
        raise
    except Exception as e:  # noqa: BLE001 -- each library has its own errors (ORT InvalidProtobuf, LiteRT ValueError)
        raise BundleError(f"{bundle.path / entry.file}: the {entry.format} runtime cannot load it "
                          f"({error_summary(e)}); its sha256 matches the manifest, so it was exported broken: "
                          "export the bundle again") from None
    batch = entry.inputs[0].shape[0] if entry.inputs[0].shape else None
    return StaticBatch(loaded, batch) if isinstance(batch, int) else loaded


def checked_run(runtime: Runtime, inputs: np.ndarray, file: Path) -> np.ndarray:
    """`runtime.run(inputs)`, with a failure of the model `file` as one BundleError naming it."""
    try:
        return runtime.run(inputs)
    except Exception as e:  # noqa: BLE001 -- a model whose inputs or outputs differ from its manifest entry
        raise BundleError(f"{file}: running it failed ({error_summary(e)}); expected a model with the inputs and "
                          "outputs its manifest entry lists") from None


def error_summary(e: Exception) -> str:
    """`Type: first line of the message`, for one-line errors about a library's exception."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
