"""`nmoe train --executor ray`: the same round loop with the clients' updates as Ray tasks (issue 14).

One local Ray with 2 CPUs for the whole module (starting it takes ~5 s). Torch runs one thread in
this process and in every worker during these tests, so that both runs add floats in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit import extras
from toolkit.cli import main
from toolkit.config import load
from toolkit.pipeline import Pipeline
from toolkit.rundir import train

pytest.importorskip("ray")
from toolkit.federated.ray_executor import RayExecutor

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.toml"
SMALL = ['stage1.methods=["fedce","fedsc"]', 'gate.methods=["fedgate","rollgate","rangate"]',
         'baselines.methods=["fedavg"]', "federated.rounds=2", "gate.rounds=2", "expert.epochs=2"]


@pytest.fixture(scope="module")
def ray_executor() -> Iterator[RayExecutor]:
    executor = RayExecutor(num_cpus=2)
    yield executor
    executor.close()


@pytest.fixture()
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def checkpoint_arrays(run: Path, job: str) -> dict[str, np.ndarray]:
    with np.load(run / "checkpoints" / f"{job}.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.mark.slow
def test_ray_gives_the_in_process_metrics_exactly(tmp_path: Path, ray_executor: RayExecutor,
                                                 one_thread: None) -> None:
    cfg = load(TINY, SMALL)
    local = train(cfg, tmp_path / "inprocess", show_progress=False)
    remote = train(cfg, tmp_path / "ray", show_progress=False, executor=ray_executor, place=ray_executor.place)
    assert remote["methods"] == local["methods"]
    for job in ("stage1_fedce", "stage1_fedsc", "stage3_fedce_fedgate"):
        a, b = checkpoint_arrays(tmp_path / "inprocess", job), checkpoint_arrays(tmp_path / "ray", job)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), job


def test_client_data_goes_to_the_object_store_once(tmp_path: Path, ray_executor: RayExecutor) -> None:
    cfg = load(TINY, ["federated.rounds=3", "data.num_clients=3"])
    pipeline = Pipeline(cfg, tmp_path, show_progress=False, executor=ray_executor, place=ray_executor.place)
    before = ray_executor.puts
    pipeline.recipe.stage1("fedce")
    assert ray_executor.puts - before == 3  # one per client, not one per client and round
    pipeline.recipe.stage1("fedsc")
    assert ray_executor.puts - before == 3  # another job on the same data reuses it


def test_ray_options_give_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["train", str(TINY), "--out", str(tmp_path / "run"), "--quiet"]
    threads = torch.get_num_threads()
    assert main([*base, "--ray-address", "127.0.0.1:9"]) == 2
    assert capsys.readouterr().err == "nmoe: error: --ray-address needs --executor ray\n"
    assert main([*base, "--executor", "ray", "--ray-address", "127.0.0.1:9"]) == 2  # nothing listens there
    err = capsys.readouterr().err
    assert err.startswith("nmoe: error: --ray-address 127.0.0.1:9: no Ray cluster reachable") and err.count("\n") == 1
    monkeypatch.setattr(extras, "installed", lambda module: module != "ray")
    assert main([*base, "--executor", "ray"]) == 2
    err = capsys.readouterr().err
    assert "needs the [scale] extra" in err and err.count("\n") == 1
    assert torch.get_num_threads() == threads  # a failed start leaves this process as it was
