"""Bundles of the gate methods with a shared expert (fedgate_vl, localgate_vl: mode "routed"; fedgate_ood:
mode "fallback" with an OOD score): `nmoe export` writes them (schema 3), the device side runs them without
torch as the run's torch evaluation did, and agents over a real mosquitto predict exactly like LocalNMoE,
also on inputs that use the shared expert."""

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from broker.process import BrokerOptions, RunningBroker, start_broker
from device_agent.agent import Agent
from device_agent.bundle import Bundle, BundleError, load_bundle
from device_agent.device_models import DeviceModels
from device_agent.model_build import ModelBuildError
from device_agent.nmoe_local import LocalNMoE, preprocess
from device_agent.rebuild import NewWeights, rebuild_bundle
from device_agent.sample_check import check_against_samples
from device_agent.wire.mqtt_transport import BrokerUrl, MqttSettings, MqttTransport
from export.bundle_writer import device_modules, with_ood_scores
from export.parity import expert_outputs
from toolkit.artifacts import load_nmoe
from toolkit.cli import main
from toolkit.evaluate import gate_router, nmoe_predict
from toolkit.federated_data import FederatedData, prepare, raw_images
from toolkit.fleet.trial_summary import RequestPath, path_of

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = 3
METHOD = "nmoe_fedce_fedgate_vl"
OOD = "nmoe_fedce_fedgate_ood"
EXPORTED = (METHOD, OOD)
# top-3 of 3 experts + the shared one: the tiny run's gates pick the shared expert for a few inputs
RUN = ["--set", 'stage1.methods=["fedce"]', "--set", 'gate.methods=["fedgate_vl", "localgate_vl", "fedgate_ood"]',
       "--set", "baselines.methods=[]", "--set", f"data.num_clients={CLIENTS}", "--set", "data.alpha=0.1",
       "--set", "gate.virtual_per_class=100", "--set", "model.top_k=3"]


@pytest.fixture(scope="module")
def vl_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vl-run")
    assert main(["train", str(ROOT / "configs" / "tiny.toml"), "--out", str(out), "--quiet", *RUN]) == 0
    return out


@pytest.fixture(scope="module")
def exports(vl_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`nmoe export` of both methods, ONNX fp32 + int8 (int8 drops are judged by the tests, not the export)."""
    out = {}
    for method in EXPORTED:
        out[method] = tmp_path_factory.mktemp(method)
        assert main(["export", str(vl_run), "--out", str(out[method]), "--method", method, "--formats", "onnx",
                     "--quiet", "--calibration-samples", "32", "--max-accuracy-drop", "100"]) == 0
    return out


@pytest.fixture(scope="module")
def vl_bundles(exports: dict[str, Path]) -> Path:
    return exports[METHOD]


def load_fleet(folder: Path) -> dict[int, Bundle]:
    return {c: load_bundle(folder / f"device-{c}") for c in range(CLIENTS)}


@pytest.fixture(scope="module")
def fleet(vl_bundles: Path) -> dict[int, Bundle]:
    return load_fleet(vl_bundles)


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


def test_fallback_bundles_carry_the_ood_score(exports: dict[str, Path]) -> None:
    for bundle in load_fleet(exports[OOD]).values():
        m = bundle.manifest
        assert (m.schema_version, m.gate_outputs, m.shared_expert.mode) == (3, CLIENTS, "fallback")  # type: ignore[union-attr]
        assert bundle.model("gate", "fp32").outputs[0].shape == ["batch", CLIENTS]
        tensors = bundle.ood_tensors()
        assert tensors["means"].shape[1] == m.latent_dim and tensors["precision"].shape == (m.latent_dim,) * 2
        assert "ood_score" in bundle.samples()


@pytest.mark.parametrize("method", EXPORTED)
def test_parity_report_covers_the_shared_expert_and_matches_the_runs_accuracy(exports: dict[str, Path], vl_run: Path,
                                                                             method: str) -> None:
    report = json.loads((exports[method] / "report.json").read_text())
    rows = [m for m in report["models"] if m["role"] == "shared_expert"]
    assert {(m["device"], m["precision"]) for m in rows} == {(f"device-{c}", p) for c in range(CLIENTS)
                                                             for p in ("fp32", "int8")}
    for m in rows:
        if m["precision"] == "fp32":
            assert m["max_abs_diff"] < 1e-5 and m["agreement"] == 1.0
        else:
            assert m["max_abs_diff"] < 0.1 * m["reference_max_abs"] and m["agreement"] >= 0.9
    per_client = json.loads((vl_run / "metrics.json").read_text())["methods"][method]["per_client"]
    run = {f"device-{r['client']}": 100 * r["personalized_accuracy"] for r in per_client}
    for r in report["nmoe"]:
        assert r["run_accuracy"] == pytest.approx(run[r["device"]])
        assert r["torch_accuracy"] == pytest.approx(r["run_accuracy"])  # the export's torch NMoE is the run's
        if r["precision"] == "fp32":
            assert r["accuracy"] == r["torch_accuracy"] and r["agreement"] == 1.0
        else:  # 100 test inputs per device: a point is one input
            assert r["drop"] <= 3.0 and r["agreement"] >= 0.95
    assert len(report["ood"]) == (CLIENTS if method == OOD else 0)
    for o in report["ood"]:
        assert o["max_abs_diff"] < 1e-4 and o["agreement"] == 1.0 and o["handed_off"] > 0


def uses_shared(local: LocalNMoE, c: int, images: np.ndarray) -> np.ndarray:
    """Indices of the images for which device c gives the shared expert (expert id num_experts) a weight > 1e-3."""
    p = local.predict(c, images)
    return np.nonzero(((p.experts == CLIENTS) & (p.weights > 1e-3)).any(axis=1))[0]


@pytest.mark.parametrize("method", EXPORTED)
def test_local_nmoe_equals_the_torch_evaluation_of_the_method(vl_run: Path, exports: dict[str, Path],
                                                              data: FederatedData, method: str) -> None:
    fleet = load_fleet(exports[method])
    local = LocalNMoE(fleet, "fp32")
    mods = with_ood_scores(load_nmoe(vl_run, method), device_modules(load_nmoe(vl_run, method)), data)
    used = 0
    for c in range(CLIENTS):
        x = torch.cat([data.personal_test[c].x, data.global_test.x])
        images = raw_images(x, fleet[c].manifest.input)
        got = local.predict(c, images)
        probs, idx = nmoe_predict(mods[c].router(local.top_k, CLIENTS), expert_outputs(mods[c], mods, x))
        assert np.array_equal(got.experts, idx.numpy())
        assert np.abs(got.probs - probs.numpy()).max() < 1e-4  # the OOD score: numpy vs torch float32
        assert np.array_equal(got.labels, probs.argmax(dim=1).numpy())
        used += len(uses_shared(local, c, images))
    assert used >= 5  # the shared expert is really used


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    with start_broker(BrokerOptions(tmp_path_factory.mktemp("vl-fleet"), port=0)) as running:
        yield running


@pytest.mark.parametrize("method", EXPORTED)
def test_agents_over_mosquitto_predict_exactly_like_local_nmoe(exports: dict[str, Path], data: FederatedData,
                                                               broker: RunningBroker, method: str) -> None:
    fleet = load_fleet(exports[method])
    local = LocalNMoE(fleet, "fp32")
    images = raw_images(data.global_test.x, fleet[0].manifest.input)
    agents = {c: Agent(b, MqttTransport(MqttSettings(BrokerUrl.parse(broker.url), f"test-{method}-{c}")),
                       DeviceModels.open(b)) for c, b in fleet.items()}
    try:
        for agent in agents.values():
            agent.start()
        for agent in agents.values():
            assert agent.wait_for_experts(set(agents), 30), agent.stats()
        shared_rows = 0
        for c, agent in agents.items():
            routed = uses_shared(local, c, images)
            batch = images[np.concatenate([routed[:8], np.arange(8)])]  # using the shared expert, and any
            result, expected = agent.infer(batch), local.predict(c, batch)
            assert np.array_equal(result.probs, expected.probs), c
            assert np.array_equal(result.experts, expected.experts) and result.missing == {}
            chosen = set(np.unique(expected.experts).tolist())
            assert set(result.answered) <= chosen and (CLIENTS in result.answered) == (CLIENTS in chosen)
            shared_rows += len(routed[:8])
        assert shared_rows >= 3
        asked = sum(a.stats()["expert_server"].get("answered", 0) for a in agents.values())
        assert asked > 0  # peers did answer over MQTT; the shared expert never is a topic
    finally:
        for agent in agents.values():
            agent.stop()


@pytest.mark.parametrize("method", EXPORTED)
def test_agent_without_peers_routes_over_its_own_and_the_shared_expert(exports: dict[str, Path], data: FederatedData,
                                                                       method: str) -> None:
    """Disconnected, only the local experts are live: top-k over them (fallback: the own expert, then the
    shared one with weight s), weights summing to 1, no input without an answer."""
    bundle = load_fleet(exports[method])[1]
    models = DeviceModels.open(bundle)
    agent = Agent(bundle, MqttTransport(MqttSettings(BrokerUrl.parse("mqtt://127.0.0.1:1"), "test-alone")), models)
    z_images = raw_images(data.global_test.x[:50], bundle.manifest.input)
    result = agent.infer(z_images)
    assert set(np.unique(result.experts).tolist()) == {1, CLIENTS} and result.missing == {}
    assert np.allclose(result.weights.sum(axis=1), 1, atol=1e-6) and result.fallback_rows == 0
    if method == OOD:
        assert models.ood is not None
        s = models.ood(models.extractor.run(preprocess(z_images, bundle.manifest.input)))
        np.testing.assert_allclose(result.weights, np.stack([1 - s, s], axis=1), atol=1e-6)


@pytest.mark.parametrize("method", EXPORTED)
def test_trial_runs_the_bundles(exports: dict[str, Path], tmp_path: Path, method: str) -> None:
    out = tmp_path / "trial"
    assert main(["trial", "--bundles", str(exports[method]), "--out", str(out), "--quiet", "--samples", "6",
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
    assert main(["export", str(vl_run), "--out", str(tmp_path / "b"), "--method", "nmoe_fedce_fedgate_switch"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nmoe: error: ") and "\n" not in err and "fedgate_switch are not supported yet" in err


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


def test_an_agent_refuses_an_ood_score_that_does_not_reproduce_its_samples(exports: dict[str, Path]) -> None:
    bundle = load_fleet(exports[OOD])[0]
    models = DeviceModels.open(bundle)
    check_against_samples(bundle, models)
    assert models.ood is not None
    off = dataclasses.replace(models, ood=dataclasses.replace(models.ood, tau=models.ood.tau - 10 * models.ood.spread))
    with pytest.raises(BundleError, match=r"samples\.npz: the OOD score differs from the expected ood_score"):
        check_against_samples(bundle, off)


def test_the_trial_counts_the_shared_expert_as_local() -> None:
    assert path_of([0, CLIENTS], 0, CLIENTS) == path_of([0], 0, CLIENTS) == RequestPath.LOCAL
    assert path_of([0, 1, CLIENTS], 0, CLIENTS) == RequestPath.REMOTE and path_of(None, 0, CLIENTS) == RequestPath.UNKNOWN
