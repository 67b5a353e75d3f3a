"""Shared fixtures: one tiny trained run (synthetic data, 3 clients) for every export and agent test."""

from pathlib import Path

import pytest

from toolkit.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY_RUN = ["--set", 'stage1.methods=["fedce"]', "--set", 'gate.methods=["fedgate","rangate"]',
            "--set", 'baselines.methods=["fedavg"]', "--set", "data.num_clients=3"]


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished `nmoe train configs/tiny.toml` run (read-only for tests)."""
    out = tmp_path_factory.mktemp("run")
    assert main(["train", str(ROOT / "configs" / "tiny.toml"), "--out", str(out), "--quiet", *TINY_RUN]) == 0
    return out


@pytest.fixture(scope="session")
def onnx_tflite_bundles(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`nmoe export` of `run_dir` (3 devices, nmoe_fedce_fedgate) as ONNX and LiteRT, fp32 and int8.

    Tests may add files next to the device folders but must not change the bundles.
    """
    out = tmp_path_factory.mktemp("bundles")
    assert main(["export", str(run_dir), "--out", str(out), "--quiet", "--formats", "onnx,tflite",
                 "--calibration-samples", "32", "--max-accuracy-drop", "100"]) == 0
    return out
