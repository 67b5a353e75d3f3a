"""LiteRT format: `.tflite` via litert-torch, fp32 and PT2E int8 (int8 inputs and outputs).

The int8 model's I/O tensors are int8: their scale and zero point are read back from the file
with the LiteRT interpreter and written into the manifest, where the agent's runtime finds them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from device_agent.bundle import Quantization, TensorSpec
from export.bundle_writer import ModelSource, WrittenModel
from export.pt2e import example_input, quantize_pt2e, quiet_native_output


def convert(module: nn.Module, source: ModelSource, path: Path, quant_config: object = None) -> None:
    """litert_torch.convert on the static-batch example, written as a flatbuffer."""
    import litert_torch

    litert_torch.convert(module, (example_input(source.calibration),), quant_config=quant_config).export(str(path))


def convert_int8(source: ModelSource, path: Path) -> None:
    """Static int8 with litert-torch's PT2E quantizer (symmetric, per-channel weights)."""
    from litert_torch.quantize.pt2e_quantizer import (
        PT2EQuantizer,
        get_symmetric_quantization_config,
    )
    from litert_torch.quantize.quant_config import QuantConfig

    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    module = quantize_pt2e(source.module, source.calibration, quantizer, fold_quantize=False)
    convert(module, source, path, QuantConfig(pt2e_quantizer=quantizer))


def tensor_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The file's inputs and outputs as the interpreter sees them, with int8 quantization parameters."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))

    def spec(detail: dict[str, Any]) -> TensorSpec:
        dtype = np.dtype(detail["dtype"]).name
        scale, zero_point = detail["quantization"]
        quantization = Quantization(float(scale), int(zero_point)) if dtype in ("int8", "uint8") else None
        return TensorSpec(detail["name"], [int(d) for d in detail["shape"]], dtype, quantization)

    return ([spec(d) for d in interpreter.get_input_details()],
            [spec(d) for d in interpreter.get_output_details()])


class TFLiteFormat:
    """`<role>.fp32.tflite` and `<role>.int8.tflite`, static batch."""

    name = "tflite"

    def write(self, source: ModelSource, precisions: Sequence[str], out_dir: Path) -> list[WrittenModel]:
        written = []
        for precision in precisions:
            path = out_dir / f"{source.role}.{precision}.tflite"
            with quiet_native_output():
                if precision == "fp32":
                    convert(source.module.eval(), source, path)
                else:
                    convert_int8(source, path)
                specs = tensor_specs(path)
            written.append(WrittenModel(precision, path, *specs))
        return written


FORMAT = TFLiteFormat()
