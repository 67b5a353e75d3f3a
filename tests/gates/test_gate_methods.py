"""The extended gate methods: the fallback router, the OOD score, the held-out split, and a tiny run."""

import json
from pathlib import Path

import pytest
import torch

from toolkit.checkpoint import JobStore
from toolkit.cli import main
from toolkit.federated import Ledger
from toolkit.gates.methods import OODScore, fallback_router, split, switch_router

ROOT = Path(__file__).resolve().parents[2]
GATES = ["fedgate", "localgate", "fedgate_ood", "fedgate_vl", "localgate_vl", "fedgate_heldout", "fedgate_switch"]


def test_fallback_router_hands_weight_s_to_the_shared_expert() -> None:
    route = lambda z: (torch.tensor([[0, 1]] * len(z)), torch.tensor([[0.75, 0.25]] * len(z)))
    s = torch.tensor([0.0, 0.5, 1.0])
    idx, w = fallback_router(route, lambda z: s, shared_index=3)(torch.zeros(3, 2))
    assert idx.tolist() == [[0, 1, 3]] * 3
    torch.testing.assert_close(w, torch.tensor([[0.75, 0.25, 0.0], [0.375, 0.125, 0.5], [0.0, 0.0, 1.0]]))


def test_switch_router_takes_one_gates_top_k_per_input() -> None:
    familiar = lambda z: (torch.tensor([[0, 1]] * len(z)), torch.tensor([[0.6, 0.4]] * len(z)))
    unfamiliar = lambda z: (torch.tensor([[2, 3]] * len(z)), torch.tensor([[0.9, 0.1]] * len(z)))
    idx, w = switch_router(familiar, unfamiliar, lambda z: torch.tensor([0.2, 0.7, 0.5]))(torch.zeros(3, 2))
    assert idx.tolist() == [[0, 1], [2, 3], [0, 1]]
    torch.testing.assert_close(w, torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.6, 0.4]]))


def test_switch_needs_both_gates_trained_before_it() -> None:
    from toolkit.config import ConfigError, load
    ok = load(ROOT / "configs" / "tiny.toml", ['gate.methods=["fedgate", "fedgate_vl", "fedgate_switch"]'])
    assert ok.gate.methods[-1] == "fedgate_switch"
    with pytest.raises(ConfigError, match="gate.methods: fedgate_switch switches between fedgate and fedgate_vl"):
        load(ROOT / "configs" / "tiny.toml", ['gate.methods=["fedgate", "fedgate_switch", "fedgate_vl"]'])


def test_split_is_seeded_disjoint_and_sized() -> None:
    kept, held = split(100, 0.25, seed=3)
    assert len(held) == 25 and len(kept) == 75
    assert set(kept.tolist()) | set(held.tolist()) == set(range(100))
    assert torch.equal(held, split(100, 0.25, seed=3)[1]) and not torch.equal(held, split(100, 0.25, seed=4)[1])
    assert [len(p) for p in split(2, 0.01, seed=0)] == [1, 1]  # never an empty side


def test_ood_score_keeps_familiar_latents_and_hands_off_unseen_classes() -> None:
    gen = torch.Generator().manual_seed(0)
    centers = 6 * torch.eye(4)
    y = torch.randint(0, 2, (2000,), generator=gen)  # the device knows classes 0 and 1
    z = centers[y] + torch.randn(2000, 4, generator=gen)
    score = OODScore.fit(z, y, 4, heldout=0.25, quantile=0.95, temperature=0.25, seed=1)
    familiar = centers[torch.randint(0, 2, (1000,), generator=gen)] + torch.randn(1000, 4, generator=gen)
    unseen = centers[torch.randint(2, 4, (1000,), generator=gen)] + torch.randn(1000, 4, generator=gen)
    assert 0.02 < (score(familiar) > 0.5).float().mean() < 0.1  # ~1 - quantile of familiar inputs hand off
    assert (score(unseen) > 0.99).float().mean() > 0.99


@pytest.fixture(scope="module")
def gates_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gates")
    args = ["train", str(ROOT / "configs" / "tiny.toml"), "--out", str(out), "--quiet",
            "--set", 'stage1.methods=["fedce"]', "--set", f"gate.methods={json.dumps(GATES)}",
            "--set", 'baselines.methods=["fedavg"]', "--set", "data.num_clients=3", "--set", "data.alpha=0.1",
            "--set", "gate.virtual_per_class=100"]
    assert main(args) == 0
    return {"out": out, "metrics": json.loads((out / "metrics.json").read_text())}


def test_every_nmoe_method_reports_the_ceilings(gates_run: dict) -> None:
    methods = gates_run["metrics"]["methods"]
    for gate in GATES:
        ceiling = methods[f"nmoe_fedce_{gate}"]["ceiling"]
        oracle, per_class = ceiling["oracle_routing"], ceiling["best_expert_per_class"]
        assert ceiling == methods["nmoe_fedce_fedgate"]["ceiling"]  # a property of the Stage 2 experts
        for kind in ("personalized_accuracy", "global_accuracy"):
            assert oracle[kind] >= per_class[kind]
            if gate in ("fedgate", "localgate"):  # same experts, nothing else to route to
                assert oracle[kind] >= methods[f"nmoe_fedce_{gate}"][kind]


def test_virtual_latents_teach_the_gate_the_classes_a_device_never_saw(gates_run: dict) -> None:
    methods = gates_run["metrics"]["methods"]
    assert methods["nmoe_fedce_fedgate_vl"]["global_accuracy"] > methods["nmoe_fedce_fedgate"]["global_accuracy"] + 0.1


def test_shared_expert_is_a_routing_column_and_its_bytes_are_counted(gates_run: dict) -> None:
    methods = gates_run["metrics"]["methods"]
    for gate in ("fedgate_ood", "fedgate_vl", "localgate_vl", "fedgate_switch"):
        assert all(len(row) == 4 for row in methods[f"nmoe_fedce_{gate}"]["routing"])  # 3 experts + shared
    assert all(len(row) == 3 for row in methods["nmoe_fedce_fedgate_heldout"]["routing"])
    vl, fg = methods["nmoe_fedce_fedgate_vl"], methods["nmoe_fedce_fedgate"]
    stats = vl["revealed"]["stats_bytes_per_device"]
    classes, dim = 10, 16  # tiny.toml: synthetic data, latent_dim 16
    assert stats == 4 * classes * (1 + dim + dim * (dim + 1) // 2)  # fp32 counts, means, covariance triangles
    assert vl["revealed"]["virtual_latents"] == 100 * classes
    # the gate bodies are the same size, so the difference is each device's statistics and virtual answers
    assert vl["upload_bytes"] - fg["upload_bytes"] == 3 * (stats + 4 * 100 * classes)
    head = JobStore(gates_run["out"] / "checkpoints", "stage1_fedce").load()
    head_bytes = sum(v.nbytes for k, v in head.arrays.items() if k.startswith("shared/head."))
    table = 4 * 100 * classes * 3  # every expert's true-class probability on every virtual latent
    assert vl["download_bytes"] - fg["download_bytes"] == 3 * (stats + head_bytes + table)
    assert methods["nmoe_fedce_localgate_vl"]["upload_bytes"] < vl["upload_bytes"]  # nothing of the gate averaged
    # the OOD fallback uploads nothing more than FedGate (its own data sets the threshold); the server
    # sends every device the shared expert
    ood = methods["nmoe_fedce_fedgate_ood"]
    assert ood["upload_bytes"] == fg["upload_bytes"] and ood["download_bytes"] == fg["download_bytes"] + 3 * head_bytes


def test_final_layers_never_leave_the_device(gates_run: dict) -> None:
    for gate in ("fedgate_vl", "fedgate_heldout"):
        state = JobStore(gates_run["out"] / "checkpoints", f"stage3_fedce_{gate}").load()
        names = Ledger.from_json(state.meta["ledger"]).names_sent()
        assert names and not any(n.startswith("final.") for n in names)
    local = JobStore(gates_run["out"] / "checkpoints", "stage3_fedce_localgate_vl").load()
    assert not Ledger.from_json(local.meta["ledger"]).names_sent()


def test_export_refuses_the_gate_methods_bundles_do_not_carry() -> None:
    from toolkit.artifacts import ArtifactError, parse_method
    assert parse_method("nmoe_fedce_fedgate") == ("fedce", "fedgate")
    assert parse_method("nmoe_fedsc_localgate_vl") == ("fedsc", "localgate_vl")
    assert parse_method("nmoe_hybrid_fedgate_ood") == ("hybrid", "fedgate_ood")
    for gate in ("fedgate_heldout", "fedgate_switch"):
        with pytest.raises(ArtifactError, match="bundles of fedgate_heldout, fedgate_switch are not supported yet"):
            parse_method(f"nmoe_fedce_{gate}")
