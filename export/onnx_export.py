"""ONNX format: dynamo export with a dynamic batch dimension, checked, plus static int8 QDQ."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import onnx
import torch

from device_agent.model_build import OPSET, tensor_specs
from device_agent.quantize import quantize_int8
from export.bundle_writer import ModelSource, WrittenModel


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress lines and its torchvision/deprecation notices."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def export_fp32(source: ModelSource, path: Path) -> None:
    """torch.onnx.export(dynamo=True) with input/output names and a dynamic batch, then onnx.checker."""
    example = torch.from_numpy(source.calibration[:1])
    with _quiet_exporter():
        program = torch.onnx.export(
            source.module.eval(), (example,), dynamo=True, opset_version=OPSET, verbose=False,
            input_names=[source.input_name], output_names=[source.output_name],
            dynamic_shapes={source.input_name: {0: torch.export.Dim("batch")}})
    assert program is not None  # dynamo=True always returns the program
    program.save(str(path))
    strip_debug_info(path)
    onnx.checker.check_model(str(path), full_check=True)


def strip_debug_info(path: Path) -> None:
    """Drop the exporter's per-node metadata (source paths, stack traces, FX names) and doc strings.

    They tell a device nothing, leak the build machine's paths into bundles and weigh ~7 KB.
    """
    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(model, str(path))


class OnnxFormat:
    """`<role>.fp32.onnx` and `<role>.int8.onnx` (float I/O; the int8 one is quantized from fp32)."""

    name = "onnx"

    def write(self, source: ModelSource, precisions: Sequence[str], out_dir: Path) -> list[WrittenModel]:
        paths = {p: out_dir / f"{source.role}.{p}.onnx" for p in precisions}
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = paths.get("fp32", Path(tmp) / "fp32.onnx")
            export_fp32(source, fp32)
            if "int8" in paths:
                quantize_int8(fp32, paths["int8"], source.input_name, source.calibration)
                strip_debug_info(paths["int8"])
        return [WrittenModel(p, path, *tensor_specs(onnx.load(str(path)))) for p, path in paths.items()]


FORMAT = OnnxFormat()
