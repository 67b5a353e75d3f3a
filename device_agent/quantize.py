"""Static int8 for ONNX: QDQ, per-channel int8 weights, int8 activations, float model I/O.

One implementation for `nmoe export` and for a device rebuilding its bundle: onnxruntime's
quantization tool needs `onnx` but neither torch nor sympy (its symbolic shape inference is
skipped: these graphs have static shapes apart from the batch, which ONNX's own inference covers).

Static (calibrated) quantization, never dynamic: ORT's dynamic int8 convolutions (ConvInteger)
run slower than fp32 on CPU. S8S8 QDQ is ORT's recommended CPU default and measured as fast as
U8S8 here, with the same accuracy; it also maps 1:1 onto ARM's int8 dot-product kernels.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

CALIBRATION_BATCH = 32


class ArrayCalibrationReader(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime has no type hints
    """Feeds one input's calibration array to ORT's calibrator in batches."""

    def __init__(self, input_name: str, data: np.ndarray, batch_size: int = CALIBRATION_BATCH) -> None:
        self.input_name = input_name
        self.data = np.ascontiguousarray(data, dtype=np.float32)
        self._batches = iter(range(0, len(self.data), batch_size))
        self._batch_size = batch_size

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch, None when all were given."""
        start = next(self._batches, None)
        return None if start is None else {self.input_name: self.data[start:start + self._batch_size]}


def quantize_int8(fp32: Path, out: Path, input_name: str, calibration: np.ndarray) -> None:
    """Quantize an fp32 ONNX file to int8 QDQ, calibrated (min/max) on `calibration`."""
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(fp32, prepared, skip_symbolic_shape=True)
        quantize_static(prepared, out, ArrayCalibrationReader(input_name, calibration),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    onnx.checker.check_model(str(out), full_check=True)
