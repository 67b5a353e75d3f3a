"""ExecuTorch format: `.pte` programs lowered to the XNNPACK delegate, fp32 and PT2E int8.

The int8 program keeps float inputs and outputs (quantize/dequantize run inside XNNPACK), so the
manifest carries no I/O quantization for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from device_agent.bundle import TensorSpec
from export.bundle_writer import ModelSource, WrittenModel
from export.pt2e import example_input, output_shape, quantize_pt2e, quiet_native_output


def lower_to_pte(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    """torch.export -> edge dialect -> XNNPACK partitions -> an ExecuTorch program file."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    program = torch.export.export(module, (example,))
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    path.write_bytes(lowered.buffer)


def int8_module(source: ModelSource) -> nn.Module:
    """PT2E with XNNPACK's symmetric per-channel int8 config, calibrated on the source's own data."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    return quantize_pt2e(source.module, source.calibration, quantizer)


class ExecuTorchFormat:
    """`<role>.fp32.pte` and `<role>.int8.pte`, static batch, float I/O."""

    name = "executorch"

    def write(self, source: ModelSource, precisions: Sequence[str], out_dir: Path) -> list[WrittenModel]:
        example = example_input(source.calibration)
        # [*...]: a list[int | str], as TensorSpec.shape is
        inputs = [TensorSpec(source.input_name, [*example.shape], "float32")]
        outputs = [TensorSpec(source.output_name, [*output_shape(source.module.eval(), example)], "float32")]
        written = []
        for precision in precisions:
            path = out_dir / f"{source.role}.{precision}.pte"
            with quiet_native_output():
                module = source.module.eval() if precision == "fp32" else int8_module(source)
                lower_to_pte(module, example, path)
            written.append(WrittenModel(precision, path, inputs, outputs))
        return written


FORMAT = ExecuTorchFormat()
