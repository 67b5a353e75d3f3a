"""Bundles of the gate methods with a shared expert (fedgate_vl, localgate_vl): `nmoe export` writes them
(schema 3), the device side runs them without torch exactly as the run's torch evaluation did, and agents
over a real mosquitto predict exactly like LocalNMoE, also on inputs routed to the shared expert."""

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from broker.process import BrokerOptions, RunningBroker, start_broker
from device_agent.agent import Agent
from device_agent.bundle import Bundle, load_bundle
from device_agent.device_models import DeviceModels
from device_agent.model_build import ModelBuildError
from device_agent.nmoe_local import LocalNMoE
from device_agent.rebuild import NewWeights, rebuild_bundle
from device_agent.wire.mqtt_transport import BrokerUrl, MqttSettings, MqttTransport
from export.bundle_writer import device_modules
from export.parity import expert_outputs
from toolkit.artifacts import load_nmoe
from toolkit.cli import main
from toolkit.evaluate import gate_router, nmoe_predict
from toolkit.federated_data import FederatedData, prepare, raw_images

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = 3
METHOD = "nmoe_fedce_fedgate_vl"
# top-3 of 3 experts + the shared one: the tiny run's gates pick the shared expert for a few inputs
RUN = ["--set", 'stage1.methods=["fedce"]', "--set", 'gate.methods=["fedgate_vl", "localgate_vl"]',
       "--set", "baselines.methods=[]", "--set", f"data.num_clients={CLIENTS}", "--set", "data.alpha=0.1",
       "--set", "gate.virtual_per_class=100", "--set", "model.top_k=3"]


@pytest.fixture(scope="module")
def vl_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vl-run")
    assert main(["train", str(ROOT / "configs" / "tiny.toml"), "--out", str(out), "--quiet", *RUN]) == 0
    return out


@pytest.fixture(scope="module")
def vl_bundles(vl_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vl-bundles")
    assert main(["export", str(vl_run), "--out", str(out), "--method", METHOD, "--formats", "onnx", "--quiet",
                 "--calibration-samples", "32"]) == 0
    return out


@pytest.fixture(scope="module")
def fleet(vl_bundles: Path) -> dict[int, Bundle]:
    return {c: load_bundle(vl_bundles / f"device-{c}") for c in range(CLIENTS)}


@pytest.fixture(scope="module")
def data(vl_run: Path) -> FederatedData:
    return prepare(load_nmoe(vl_run, METHOD).config.data)


def test_export_writes_the_shared_expert_as_the_gates_last_output(fleet: dict[int, Bundle]) -> None:
    for bundle in fleet.values():
        m = bundle.manifest
        assert (m.schema_version, m.num_experts, m.gate_outputs) == (3, CLIENTS, CLIENTS + 1)
        assert (m.shared_expert.index, m.shared_expert.local) == (CLIENTS, True)  # type: ignore[union-attr]
        assert bundle.model("gate", "int8").outputs[0].shape == ["batch", CLIENTS + 1]
        assert {e.role for e in m.models} == {"extractor", "gate", "expert", "shared_expert"}
        assert m.provenance["method"] == METHOD and "shared_expert_probs" in bundle.samples()
    shared = {(bundle.path / bundle.model("shared_expert", "fp32").file).read_bytes() for bundle in fleet.values()}
    assert len(shared) == 1  # the server sent every device the same calibrated shared expert


def test_parity_report_covers_the_shared_expert_and_matches_the_runs_accuracy(vl_bundles: Path, vl_run: Path) -> None:
    report = json.loads((vl_bundles / "report.json").read_text())
    rows = [m for m in report["models"] if m["role"] == "shared_expert"]
    assert {(m["device"], m["precision"]) for m in rows} == {(f"device-{c}", p) for c in range(CLIENTS)
                                                             for p in ("fp32", "int8")}
    for m in rows:
        if m["precision"] == "fp32":
            assert m["max_abs_diff"] < 1e-5 and m["agreement"] == 1.0
        else:
            assert m["max_abs_diff"] < 0.1 * m["reference_max_abs"] and m["agreement"] >= 0.9
    per_client = json.loads((vl_run / "metrics.json").read_text())["methods"][METHOD]["per_client"]
    run = {f"device-{r['client']}": 100 * r["personalized_accuracy"] for r in per_client}
    for r in report["nmoe"]:
        assert r["run_accuracy"] == pytest.approx(run[r["device"]])
        assert r["torch_accuracy"] == pytest.approx(r["run_accuracy"])  # the export's torch NMoE is the run's
        if r["precision"] == "fp32":
            assert r["accuracy"] == r["torch_accuracy"] and r["agreement"] == 1.0
        else:
            assert r["drop"] <= 2.0
    assert report["failures"] == []


def shared_routed(local: LocalNMoE, c: int, images: np.ndarray) -> np.ndarray:
    """Indices of the images device c routes to the shared expert (expert id num_experts)."""
    return np.nonzero((local.predict(c, images).experts == CLIENTS).any(axis=1))[0]


def test_local_nmoe_equals_the_torch_evaluation_of_the_method(vl_run: Path, fleet: dict[int, Bundle],
                                                              data: FederatedData) -> None:
    local = LocalNMoE(fleet, "fp32")
    mods = device_modules(load_nmoe(vl_run, METHOD))
    routed = 0
    for c in range(CLIENTS):
        x = torch.cat([data.personal_test[c].x, data.global_test.x])
        got = local.predict(c, raw_images(x, fleet[c].manifest.input))
        assert mods[c].gate is not None
        probs, idx = nmoe_predict(gate_router(mods[c].gate, local.top_k), expert_outputs(mods[c], mods, x))
        assert np.array_equal(got.experts, idx.numpy())
        assert np.abs(got.probs - probs.numpy()).max() < 1e-5
        assert np.array_equal(got.labels, probs.argmax(dim=1).numpy())
        routed += int((got.experts == CLIENTS).any(axis=1).sum())
    assert routed >= 5  # the shared expert is really used


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    with start_broker(BrokerOptions(tmp_path_factory.mktemp("vl-fleet"), port=0)) as running:
        yield running


def test_agents_over_mosquitto_predict_exactly_like_local_nmoe(fleet: dict[int, Bundle], data: FederatedData,
                                                               broker: RunningBroker) -> None:
    local = LocalNMoE(fleet, "fp32")
    images = raw_images(data.global_test.x, fleet[0].manifest.input)
    agents = {c: Agent(b, MqttTransport(MqttSettings(BrokerUrl.parse(broker.url), f"test-vl-{c}")),
                       DeviceModels.open(b)) for c, b in fleet.items()}
    try:
        for agent in agents.values():
            agent.start()
        for agent in agents.values():
            assert agent.wait_for_experts(set(agents), 30), agent.stats()
        shared_rows = 0
        for c, agent in agents.items():
            routed = shared_routed(local, c, images)
            batch = images[np.concatenate([routed[:8], np.arange(8)])]  # routed to the shared expert, and any
            result, expected = agent.infer(batch), local.predict(c, batch)
            assert np.array_equal(result.probs, expected.probs), c
            assert np.array_equal(result.experts, expected.experts) and result.missing == {}
            assert set(result.answered) == set(np.unique(expected.experts).tolist())
            shared_rows += len(routed[:8])
        assert shared_rows >= 3
        asked = sum(a.stats()["expert_server"].get("answered", 0) for a in agents.values())
        assert asked > 0  # peers did answer over MQTT; the shared expert never is a topic
    finally:
        for agent in agents.values():
            agent.stop()


def test_agent_without_peers_routes_over_its_own_and_the_shared_expert(fleet: dict[int, Bundle],
                                                                       data: FederatedData) -> None:
    """Disconnected, only the local experts are live: top-k over them, renormalized."""
    bundle = fleet[1]
    agent = Agent(bundle, MqttTransport(MqttSettings(BrokerUrl.parse("mqtt://127.0.0.1:1"), "test-alone")),
                  DeviceModels.open(bundle))
    result = agent.infer(raw_images(data.global_test.x[:20], bundle.manifest.input))
    assert set(np.unique(result.experts).tolist()) <= {1, CLIENTS}
    assert np.allclose(result.weights.sum(axis=1), 1) and result.fallback_rows == 0


def test_trial_runs_the_bundles(vl_bundles: Path, tmp_path: Path) -> None:
    out = tmp_path / "trial"
    assert main(["trial", "--bundles", str(vl_bundles), "--out", str(out), "--quiet", "--samples", "6",
                 "--rate", "30"]) == 0
    summary = json.loads((out / "trial.json").read_text())
    assert summary["counts"]["answered"] == 3 * 6 and summary["exactness"]["mismatches"] == 0


def test_localgate_vl_loads_for_export_with_the_runs_accuracy(vl_run: Path, data: FederatedData) -> None:
    """localgate_vl averages nothing (its gate checkpoint has no shared part); its torch NMoE as export builds
    it (the parity report's reference) has the run's accuracy."""
    method = "nmoe_fedce_localgate_vl"
    trained = load_nmoe(vl_run, method)
    mods = device_modules(trained)
    per_client = json.loads((vl_run / "metrics.json").read_text())["methods"][method]["per_client"]
    for c, m in enumerate(mods):
        assert m.gate is not None and m.shared_expert is not None and m.gate.final.out_features == CLIENTS + 1
        test = data.personal_test[c]
        probs, _ = nmoe_predict(gate_router(m.gate, trained.config.model.top_k), expert_outputs(m, mods, test.x))
        accuracy = float((probs.argmax(dim=1) == test.y).float().mean())
        assert accuracy == pytest.approx(per_client[c]["personalized_accuracy"])


def test_methods_without_bundles_are_one_error_line(vl_run: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(vl_run), "--out", str(tmp_path / "b"), "--method", "nmoe_fedce_fedgate_ood"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nmoe: error: ") and "\n" not in err and "fedgate_ood" in err


def test_a_run_without_the_shared_expert_checkpoint_is_one_error_line(vl_run: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("config.json", "dataset.json", "metrics.json"):
        (copy / name).write_bytes((vl_run / name).read_bytes())
    (copy / "checkpoints").mkdir()
    for ckpt in (vl_run / "checkpoints").glob("stage*.npz"):
        (copy / "checkpoints" / ckpt.name).write_bytes(ckpt.read_bytes())
    assert main(["export", str(copy), "--out", str(tmp_path / "b"), "--method", METHOD]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nmoe: error: ") and "shared_expert_fedce_fedgate_vl" in err and "\n" not in err


def test_rebuild_refuses_a_shared_expert_bundle(fleet: dict[int, Bundle], tmp_path: Path) -> None:
    bundle = fleet[0]
    before = sorted(p.name for p in bundle.path.iterdir())
    with pytest.raises(ModelBuildError, match=r"a bundle with a shared expert \(schema 3.*cannot be rebuilt"):
        rebuild_bundle(bundle.path, bundle, NewWeights({}, {}, {}), bundle.samples()["images"], model_version="v2",
                       run_id="r", round_index=1)
    assert sorted(p.name for p in bundle.path.iterdir()) == before
    assert load_bundle(bundle.path).manifest.model_version == bundle.manifest.model_version
