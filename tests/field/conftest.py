"""Fixtures of the field tests: the shared export of the tiny run (3 devices) as loaded bundles."""

from pathlib import Path

import pytest

from device_agent.bundle import Bundle, load_bundle


@pytest.fixture(scope="session")
def field_bundles(onnx_tflite_bundles: Path) -> dict[int, Bundle]:
    """The tiny fleet's bundles by expert id."""
    loaded = [load_bundle(p) for p in sorted(onnx_tflite_bundles.glob("device-*"))]
    return {b.manifest.expert_id: b for b in loaded}
