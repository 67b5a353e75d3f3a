"""Many clients (issue 14): the configs load and partition, and the simulation does no per-device work
that every device could share (no N^2 expert passes over the public test set, no N builds of one model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.config import load
from toolkit.federated_data import prepare
from toolkit.pipeline import Pipeline
from toolkit.simulation import ModelFactory, SimDevice

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.toml"


def test_the_many_client_configs_load() -> None:
    f100 = load(ROOT / "configs" / "fmnist-100.toml")
    assert (f100.data.num_clients, f100.federated.client_fraction) == (100, 0.1)
    s1000 = load(ROOT / "configs" / "synthetic-1000.toml")
    assert s1000.data.num_clients == 1000 and s1000.data.dataset == "synthetic"


@pytest.mark.slow
def test_a_thousand_clients_get_their_data() -> None:
    fd = prepare(load(ROOT / "configs" / "synthetic-1000.toml").data)
    assert fd.num_clients == 1000 and min(len(t) for t in fd.train) >= 10


def test_every_device_starts_from_one_build_of_the_initial_model(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[int] = []
    seeded = ModelFactory.seeded
    monkeypatch.setattr(ModelFactory, "seeded", lambda self, build, seed: builds.append(seed) or seeded(self, build, seed))
    pipeline = Pipeline(load(TINY, ["data.num_clients=6"]), tmp_path, show_progress=False)
    clients = [d.stage1("fedce") for d in pipeline.devices]
    assert len(builds) == 1 and len(clients) == 6


def test_the_public_test_set_goes_through_each_expert_once_per_fleet(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load(TINY, ["data.num_clients=4", 'stage1.methods=["fedce"]', 'gate.methods=["rangate"]',
                      'baselines.methods=["fedavg"]', "federated.rounds=1", "expert.epochs=1"])
    pipeline = Pipeline(cfg, tmp_path, show_progress=False)
    rows: list[int] = []
    outputs = SimDevice.expert_outputs
    monkeypatch.setattr(SimDevice, "expert_outputs", lambda self, stage1, z: rows.append(len(z)) or outputs(self, stage1, z))
    pipeline.recipe.nmoe("fedce")
    public = len(pipeline.fd.global_test)
    n = pipeline.n
    assert rows.count(public) == n  # each expert once, not once per device and expert (n * n)
    assert len(rows) == n * n + n  # plus one request per device and peer for the device's own splits
    tensors = {id(d._gate_inputs["fedce"].public.probs) for d in pipeline.devices}
    assert len(tensors) == 1  # and every device holds the same tensor
