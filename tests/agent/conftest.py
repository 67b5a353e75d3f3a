"""Fixtures of the device-agent tests: the shared export of the tiny run, a random-routing variant."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from device_agent.bundle import MANIFEST, Bundle, load_bundle


@pytest.fixture(scope="session")
def agent_bundles_dir(onnx_tflite_bundles: Path) -> Path:
    """The shared export of the tiny run: 3 gate-routed bundles, ONNX and LiteRT, fp32 and int8."""
    return onnx_tflite_bundles


@pytest.fixture(scope="session")
def bundles(agent_bundles_dir: Path) -> dict[int, Bundle]:
    """The fleet's bundles by expert id."""
    loaded = [load_bundle(p) for p in sorted(agent_bundles_dir.glob("device-*"))]
    return {b.manifest.expert_id: b for b in loaded}


@pytest.fixture(scope="session")
def random_bundles(agent_bundles_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Bundle]:
    """The same fleet with routing "random" (RanGate): the gate models removed from the manifests."""
    out = tmp_path_factory.mktemp("random-bundles")
    fleet = {}
    for src in sorted(agent_bundles_dir.glob("device-*")):
        dst = shutil.copytree(src, out / src.name)
        manifest = json.loads((dst / MANIFEST).read_text())
        manifest["routing"] = "random"
        manifest["models"] = [m for m in manifest["models"] if m["role"] != "gate"]
        (dst / MANIFEST).write_text(json.dumps(manifest))
        bundle = load_bundle(dst)
        fleet[bundle.manifest.expert_id] = bundle
    return fleet


@pytest.fixture(scope="session")
def images(bundles: dict[int, Bundle]) -> np.ndarray:
    """Every device's sample images (uint8 [24, 1, 16, 16])."""
    return np.concatenate([b.samples()["images"] for b in bundles.values()])
