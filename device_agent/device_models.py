"""The three models a device runs (extractor, gate, its own expert), opened from a verified bundle."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from device_agent.bundle import Bundle, BundleError
from device_agent.runtime import Runtime, open_runtime

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
    """A device's runtimes; `gate` is None for a bundle with random routing."""

    extractor: Runtime
    gate: Runtime | None
    expert: Runtime
    format: str

    @classmethod
    def open(cls, bundle: Bundle, precision: str = "fp32", format: str = "onnx",
             intra_op_threads: int = 1) -> DeviceModels:
        """Load the bundle's models of one precision and format (BundleError / UnsupportedFormat)."""

        def load(role: str) -> Runtime:
            return LockedRuntime(open_runtime(bundle, bundle.model(role, precision, format), intra_op_threads))

        gate = load("gate") if bundle.manifest.routing == "gate" else None
        return cls(load("extractor"), gate, load("expert"), format)


def model_version(bundle: Bundle) -> str:
    """The version peers must share: the run's config hash from the bundle's provenance."""
    version = bundle.manifest.provenance.get("config_hash")
    if not isinstance(version, str) or not 1 <= len(version.encode("utf-8")) <= 255:
        raise BundleError(f"{bundle.path / 'manifest.json'}: provenance.config_hash must be a string of "
                          f"1..255 bytes (the model version peers compare), got {version!r}")
    return version
