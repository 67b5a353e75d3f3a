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
