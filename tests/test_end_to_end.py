"""`nmoe train` end to end on synthetic data: outputs, metrics schema, resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from toolkit.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.toml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", str(TINY), "--out", str(out), "--quiet"]) == 0
    return out


def test_run_dir_has_every_output(tiny_run: Path) -> None:
    for name in ("config.json", "metrics.json", "report.md", "run.log"):
        assert (tiny_run / name).stat().st_size > 0, name
    plots = list((tiny_run / "plots").glob("*.png"))
    assert {p.name for p in plots} >= {"accuracy_per_round.png", "per_client_accuracy.png", "summary.png"}
    assert any(p.name.startswith("routing_") for p in plots)


def test_metrics_schema(tiny_run: Path) -> None:
    m = json.loads((tiny_run / "metrics.json").read_text())
    assert m["dataset"] == "synthetic" and m["config"]["data"]["num_clients"] == 4
    expected = {"local", "fedavg", "fedavg_ft", "centralized"} | {
        f"nmoe_{s}_{g}" for s in ("fedce", "fedsc", "hybrid")
        for g in ("rangate", "rollgate", "fedavggate", "fedgate", "localgate")}
    assert set(m["methods"]) == expected
    for name, r in m["methods"].items():
        assert 0.0 <= r["personalized_accuracy"] <= 1.0 and 0.0 <= r["global_accuracy"] <= 1.0, name
        assert isinstance(r["upload_bytes"], int) and isinstance(r["download_bytes"], int), name
        assert [p["client"] for p in r["per_client"]] == [0, 1, 2, 3], name
        mean = sum(p["personalized_accuracy"] for p in r["per_client"]) / 4
        assert abs(mean - r["personalized_accuracy"]) < 1e-9, name
    per = m["compute"]["per_device"]
    assert per["centralized_moe"]["params"] > per["nmoe"]["params"]


def test_training_learns(tiny_run: Path) -> None:
    """Far above chance (0.1) on the synthetic data: catches label, routing or aggregation bugs."""
    r = json.loads((tiny_run / "metrics.json").read_text())["methods"]
    assert r["fedavg"]["global_accuracy"] > 0.35
    assert r["nmoe_fedce_fedgate"]["personalized_accuracy"] > 0.6
    assert r["nmoe_fedce_fedgate"]["personalized_accuracy"] > r["nmoe_fedce_rangate"]["personalized_accuracy"]


def test_bytes_follow_what_each_method_exchanges(tiny_run: Path) -> None:
    r = json.loads((tiny_run / "metrics.json").read_text())["methods"]
    assert r["local"]["upload_bytes"] == 0
    for s1 in ("fedce", "fedsc", "hybrid"):
        stage1 = r[f"nmoe_{s1}_rangate"]["upload_bytes"]  # RanGate exchanges nothing beyond Stage 1
        assert stage1 > 0 and r[f"nmoe_{s1}_localgate"]["upload_bytes"] == stage1
        # FedGate keeps the final layer home: strictly less than the fully averaged gate
        assert stage1 < r[f"nmoe_{s1}_fedgate"]["upload_bytes"] < r[f"nmoe_{s1}_fedavggate"]["upload_bytes"]
    assert r["nmoe_fedce_rangate"]["upload_bytes"] == r["fedavg"]["upload_bytes"]  # FedCE is fedavg's job


def test_results_command_prints_the_table(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["results", str(tiny_run)]) == 0
    out = capsys.readouterr().out
    assert "nmoe_fedce_fedgate" in out and "fedavg_ft" in out


def test_rerun_recomputes_nothing(tiny_run: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in (tiny_run / "checkpoints").iterdir()}
    assert main(["train", str(TINY), "--out", str(tiny_run), "--quiet"]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (tiny_run / "checkpoints").iterdir()}
    assert before == after


def test_different_config_in_same_run_dir_is_refused(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", str(TINY), "--out", str(tiny_run), "--set", "gate.rounds=4"]) == 2
    assert "gate.rounds: 3 -> 4" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path: Path) -> None:
    args = ["--set", "federated.rounds=12", "--set", 'stage1.methods=["fedce"]',
            "--set", 'gate.methods=["fedgate"]', "--set", 'baselines.methods=["fedavg"]', "--quiet"]
    clean = tmp_path / "clean"
    assert main(["train", str(TINY), "--out", str(clean), *args]) == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "train", str(TINY), "--out", str(killed), *args],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoints" / "stage1_fedce.npz"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (killed / "metrics.json").exists(), "the run was not killed mid-way"

    assert main(["train", str(TINY), "--out", str(killed), *args]) == 0
    assert "resuming" in (killed / "run.log").read_text()
    a = json.loads((clean / "metrics.json").read_text())["methods"]
    b = json.loads((killed / "metrics.json").read_text())["methods"]
    assert a == b


def test_trained_models_load_back_for_export(tiny_run: Path) -> None:
    import torch

    from toolkit.artifacts import ArtifactError, load_nmoe
    from toolkit.models import Expert, Extractor, Gate
    from toolkit.torch_params import set_params

    nmoe = load_nmoe(tiny_run, "nmoe_fedce_fedgate")
    assert nmoe.dataset["input_shape"] == [1, 16, 16] and len(nmoe.dataset["class_names"]) == 10
    assert len(nmoe.devices) == 4
    m = nmoe.config.model
    ext = set_params(Extractor(tuple(nmoe.dataset["input_shape"]), m.width, m.latent_dim), nmoe.devices[0].extractor)
    z = ext(torch.zeros(2, 1, 16, 16))
    for d in nmoe.devices:
        assert set_params(Gate(m.latent_dim, m.gate_hidden, 4), d.gate)(z).shape == (2, 4)
        assert set_params(Expert(m.latent_dim, m.expert_hidden, 10), d.expert)(z).shape == (2, 10)
    # FedGate: shared body, personal final layers
    assert (nmoe.devices[0].gate["body.0.weight"] == nmoe.devices[1].gate["body.0.weight"]).all()
    assert not (nmoe.devices[0].gate["final.weight"] == nmoe.devices[1].gate["final.weight"]).all()
    assert load_nmoe(tiny_run, "nmoe_fedce_rangate").devices[0].gate is None
    with pytest.raises(ArtifactError, match="not an NMoE method"):
        load_nmoe(tiny_run, "fedavg")
    with pytest.raises(ArtifactError, match="is not a run dir"):
        load_nmoe(tiny_run / "nope", "nmoe_fedce_fedgate")


def test_bad_data_path_is_one_clear_error_and_fixing_it_works(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    base = ["train", str(ROOT / "configs" / "quick.toml"), "--out", str(out), "--quiet"]
    assert main([*base, "--set", f"data.path={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere") in err and "train-images-idx3-ubyte" in err
    # the corrected config is accepted in the same run dir (nothing had started)
    assert main([*base[:-1], "--dry-run"]) == 0
    from toolkit import config
    from toolkit.rundir import claim
    assert claim(out, config.load(ROOT / "configs" / "quick.toml")) is False
