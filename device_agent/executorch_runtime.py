"""ExecuTorch runtime for `.pte` bundle models.

ExecuTorch's Python bindings (`executorch.runtime`) link libtorch and take torch tensors, so this is
the one device_agent module that imports torch (an import-linter exception names it). On phones
and microcontrollers ExecuTorch's C++ runtime needs no torch; the agent's ONNX and LiteRT paths
never load this module.
"""

from __future__ import annotations

import numpy as np

from device_agent.bundle import ModelEntry
from device_agent.runtime import MissingRuntime, from_model_output, to_model_input


class ExecuTorchRuntime:
    """One `forward` method of an ExecuTorch program (XNNPACK delegate inside)."""

    def __init__(self, model: bytes, entry: ModelEntry, intra_op_threads: int = 1) -> None:
        try:
            import torch
            from executorch.runtime import Runtime
        except ModuleNotFoundError as e:
            raise MissingRuntime(f"format 'executorch' needs the executorch Python package, whose bindings "
                                 f"also need torch (missing: {e.name}); pip install executorch torch, or "
                                 f"export the bundle as onnx or tflite for a torch-free device") from None
        _set_threads(intra_op_threads)
        self._torch = torch
        # The method points into the program and the program into `model`: keep all three alive
        # (dropping the program while its method runs is a use-after-free in the bindings).
        self._model = model
        self._program = Runtime.get().load_program(model)
        self._method = self._program.load_method("forward")
        self._input, self._output = entry.inputs[0], entry.outputs[0]
        self.name = f"executorch XNNPACK, {intra_op_threads} thread(s): {entry.file}"

    def run(self, inputs: np.ndarray) -> np.ndarray:
        x = self._torch.from_numpy(np.ascontiguousarray(to_model_input(inputs, self._input)))
        return from_model_output(self._method.execute([x])[0].numpy(), self._output)


def _set_threads(n: int) -> None:
    """Size ExecuTorch's process-wide threadpool (shared by every loaded program) to n threads."""
    from executorch.extension.pybindings import _C

    if _C._threadpool_get_thread_count() != n:
        _C._unsafe_reset_threadpool(n)
