"""The models a device runs (extractor, gate, its own expert, and a shared expert when the bundle has one),
opened from a verified bundle."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from device_agent.bundle import Bundle, BundleError, Manifest
from device_agent.ood_score import OODScore
from device_agent.runtime import Runtime, checked_run, open_runtime

RUNTIME_NAMES = {"onnx": "onnxruntime", "tflite": "tflite", "executorch": "executorch"}  # presence caps


class LockedRuntime:
    """A runtime that several threads call one at a time (a LiteRT interpreter is not thread-safe;
    on a 2-core device concurrent calls gain nothing anyway)."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime, self._lock = runtime, threading.Lock()
        self.name = runtime.name

    def run(self, inputs: np.ndarray) -> np.ndarray:
        with self._lock:
            return self._runtime.run(inputs)


@dataclass(frozen=True)
class DeviceModels:
    """A device's runtimes; `gate` is None for a bundle with random routing, `shared_expert` None for a
    bundle without one (schema < 3)."""

    extractor: Runtime
    gate: Runtime | None
    expert: Runtime
    format: str
    shared_expert: Runtime | None = None
    ood: OODScore | None = None  # the shared expert's weight per input, in mode "fallback"

    def local_experts(self, manifest: Manifest) -> dict[int, Runtime]:
        """The experts this device runs itself, by routing index: its own and the shared expert."""
        local = {manifest.expert_id: self.expert}
        if self.shared_expert is not None and manifest.shared_expert is not None:
            local[manifest.shared_expert.index] = self.shared_expert
        return local

    @classmethod
    def open(cls, bundle: Bundle, precision: str = "fp32", format: str = "onnx",
             intra_op_threads: int = 1) -> DeviceModels:
        """Load the bundle's models of one precision and format, each tried once on a zero input
        (BundleError naming the file when it cannot load, run or gives the wrong shape; UnsupportedFormat)."""
        m = bundle.manifest

        def load(role: str, input_shape: list[int], outputs: int) -> Runtime:
            entry = bundle.model(role, precision, format)
            runtime = open_runtime(bundle, entry, intra_op_threads)
            probe = checked_run(runtime, np.zeros((1, *input_shape), np.float32), bundle.path / entry.file)
            if probe.shape != (1, outputs):
                raise BundleError(f"{bundle.path / entry.file}: output shape {list(probe.shape)} for one input, "
                                  f"expected [1, {outputs}] (from manifest.json)")
            return LockedRuntime(runtime)

        gate = load("gate", [m.latent_dim], m.gate_outputs) if m.routing == "gate" else None
        shared = None if m.shared_expert is None else load("shared_expert", [m.latent_dim], m.num_classes)
        ood = OODScore.of(bundle) if m.shared_expert is not None and m.shared_expert.mode == "fallback" else None
        return cls(load("extractor", m.input.shape, m.latent_dim), gate,
                   load("expert", [m.latent_dim], m.num_classes), format, shared, ood)


def model_version(bundle: Bundle) -> str:
    """The version peers must share: the manifest's model_version (schema 1: provenance.config_hash)."""
    version = bundle.manifest.model_version
    if version is None:
        raise BundleError(f"{bundle.path / 'manifest.json'}: a schema_version 1 bundle without a usable "
                          "provenance.config_hash (1..255 bytes): no model version for peers to compare")
    return version
