"""Fixtures of the scale tests: the agent tests' helpers (fleet_helpers) and the tiny fleet's bundles."""

import sys
from pathlib import Path

import pytest

from device_agent.bundle import Bundle, load_bundle

# the agent tests' fleet helpers (start_agents, Client, request_frame) are reused here
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "agent"))


@pytest.fixture(scope="session")
def fleet_bundles(onnx_tflite_bundles: Path) -> dict[int, Bundle]:
    """The shared export of the tiny run (3 devices) by expert id."""
    loaded = [load_bundle(p) for p in sorted(onnx_tflite_bundles.glob("device-*"))]
    return {b.manifest.expert_id: b for b in loaded}
