"""Config validation: bad configs fail before any work, naming the key."""

from pathlib import Path

import pytest

from toolkit import config
from toolkit.cli import main

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path) -> None:
    cfg = config.load(path)
    assert cfg.method_names()


def test_benchmark_configs_run_every_method() -> None:
    for name in ("fmnist-dir0.1", "fmnist-dir0.5", "fmnist-iid"):
        cfg = config.load(Path(__file__).parent.parent / "configs" / f"{name}.toml")
        assert len(cfg.method_names()) == 4 + 3 * 5
        assert cfg.data.num_clients == 10 and cfg.data.dataset == "fashion_mnist"


@pytest.mark.parametrize("raw, key", [
    ({"gate": {"roundz": 3}}, "gate.roundz"),
    ({"colour": "red"}, "colour"),
    ({"gate": {"rounds": "five"}}, "gate.rounds"),
    ({"gate": {"rounds": 0}}, "gate.rounds"),
    ({"gate": {"rounds": True}}, "gate.rounds"),
    ({"data": {"alpha": -1.0}}, "data.alpha"),
    ({"data": {"partition": "random"}}, "data.partition"),
    ({"model": {"top_k": 11}}, "model.top_k"),
    ({"federated": {"client_fraction": 1.5}}, "federated.client_fraction"),
    ({"stage1": {"methods": ["fedce", "fedxx"]}}, "stage1.methods[1]"),
    ({"stage1": {"methods": "fedce"}}, "stage1.methods"),
    ({"gate": {"methods": ["fedgate", "fedgate"]}}, "gate.methods"),
    ({"data": "fashion"}, "data"),
    ({"data": {"dataset": "cifar10"}}, "data.path"),
    ({"baselines": {"methods": []}, "gate": {"methods": []}}, "baselines.methods"),
    ({"federated": {"min_fit_fraction": 0}}, "federated.min_fit_fraction"),
    ({"gate": {"min_fit_clients": 11}}, "gate.min_fit_clients"),
    ({"gate": {"round_timeout": -1}}, "gate.round_timeout"),
    ({"federated": {"round_retries": -1}}, "federated.round_retries"),
    ({"expert": {"timeout": -0.5}}, "expert.timeout"),
    ({"expert": {"retries": -1}}, "expert.retries"),
])
def test_bad_values_name_the_key(raw: dict, key: str) -> None:
    with pytest.raises(config.ConfigError) as e:
        config.from_dict(raw)
    assert str(e.value).startswith(f"{key}:")


def test_overrides_are_parsed_as_toml() -> None:
    raw = config.apply_overrides({"gate": {"rounds": 3}}, [
        "gate.rounds=5", "data.partition=iid", 'gate.methods=["fedgate"]', "data.alpha=0.1"])
    cfg = config.from_dict(raw)
    assert cfg.gate.rounds == 5 and cfg.data.partition == "iid"
    assert cfg.gate.methods == ("fedgate",) and cfg.data.alpha == 0.1


def test_override_without_equals_is_an_error() -> None:
    with pytest.raises(config.ConfigError, match="key=value"):
        config.apply_overrides({}, ["gate.rounds"])


def test_hash_is_stable_and_sensitive() -> None:
    a, b = config.from_dict({}), config.from_dict({"seed": 1})
    assert a.hash() == config.from_dict({}).hash() != b.hash()


def test_cli_rejects_bad_config_before_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[gate]\nrounds = -2\n")
    out = tmp_path / "run"
    assert main(["train", str(bad), "--out", str(out)]) == 2
    assert "gate.rounds" in capsys.readouterr().err
    assert not out.exists()


def test_cli_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "r")]) == 2
    assert "nope.toml" in capsys.readouterr().err


def test_cli_invalid_toml(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[gate\n")
    assert main(["train", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_a_run_dir_written_before_a_config_key_existed_is_resumed(tmp_path: Path) -> None:
    """A key added later (e.g. federated.min_fit_fraction) takes its default: the same config, not another."""
    import json

    from toolkit.errors import RunDirConflict
    from toolkit.rundir import claim

    cfg = config.load(CONFIGS[0])
    old = cfg.to_dict()
    del old["federated"]["min_fit_fraction"], old["gate"]["round_retries"]
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "stage1_fedce.npz").touch()
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert claim(tmp_path, cfg) is True
    other = config.from_dict({**cfg.to_dict(), "gate": {**cfg.to_dict()["gate"], "round_retries": 5}})
    with pytest.raises(RunDirConflict, match="gate.round_retries: 2 -> 5"):
        claim(tmp_path, other)
