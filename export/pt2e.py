"""Shared pieces of the torch.export-based formats (ExecuTorch, LiteRT): static batch, PT2E int8, quiet tools.

Both formats are exported with a static batch of `STATIC_BATCH`: XNNPACK with a bounded dynamic
batch planned its input buffer for the wrong size (ENV-NOTES), and litert-torch bakes the batch
into reshapes. The agent's runtime layer feeds larger batches in chunks of the declared size.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

STATIC_BATCH = 1


def example_input(calibration: np.ndarray) -> torch.Tensor:
    """The first STATIC_BATCH calibration rows: the shape the exported program is specialized to."""
    return torch.from_numpy(np.ascontiguousarray(calibration[:STATIC_BATCH], dtype=np.float32))


def output_shape(module: nn.Module, example: torch.Tensor) -> list[int]:
    """The module's output shape on the example."""
    with torch.no_grad():
        return list(module(example).shape)


def quantize_pt2e(module: nn.Module, calibration: np.ndarray, quantizer: object,
                  fold_quantize: bool = True) -> torch.fx.GraphModule:
    """PT2E static int8: export, insert observers, run `calibration` through, convert."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    example = example_input(calibration)
    prepared = prepare_pt2e(torch.export.export(module.eval(), (example,)).module(), quantizer)
    usable = len(calibration) - len(calibration) % STATIC_BATCH
    with torch.no_grad():
        for start in range(0, usable, STATIC_BATCH):
            prepared(torch.from_numpy(np.ascontiguousarray(calibration[start:start + STATIC_BATCH],
                                                           dtype=np.float32)))
    quantized: torch.fx.GraphModule = convert_pt2e(prepared, fold_quantize=fold_quantize)
    return quantized


@contextlib.contextmanager
def quiet_native_output() -> Iterator[None]:
    """Swallow what converters print from C++ and Python (absl logs, progress lines, warnings).

    On an exception the captured text is replayed to stderr, so nothing needed for a diagnosis
    is lost.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    python_sink = io.StringIO()
    with (tempfile.TemporaryFile(mode="w+b") as sink, contextlib.redirect_stdout(python_sink),
          contextlib.redirect_stderr(python_sink)):
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        level = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        except BaseException:
            _restore(saved)
            sink.seek(0)
            print(sink.read().decode(errors="replace") + python_sink.getvalue(), file=sys.__stderr__)
            raise
        finally:
            logging.disable(level)
            _restore(saved)
            os.close(saved[0])
            os.close(saved[1])


def _restore(saved: tuple[int, int]) -> None:
    """Point fds 1 and 2 back at the saved originals (idempotent)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
