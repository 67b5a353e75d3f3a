"""The NMoE recipe through its device operations, as a network would drive it.

Every device is wrapped in a proxy that offers only the documented operations (no private state,
like an MQTT proxy of a device agent) and copies every tensor that crosses, as a wire would.
"""

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit import config
from toolkit.artifacts import stage1_job, stage2_job, stage3_job
from toolkit.errors import NoQuorumError
from toolkit.federated import (
    Client,
    EvaluateIns,
    EvaluateRes,
    Evaluator,
    FitIns,
    FitRes,
    Params,
    ThreadPool,
)
from toolkit.federated.operations import (
    Device,
    ExpertIns,
    ExtractorIns,
    GateDataIns,
    Report,
    Simulated,
)
from toolkit.federated.recipe import NMoERecipe
from toolkit.gates import GatesRecipe
from toolkit.pipeline import Pipeline
from toolkit.simulation import SimDevice

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["data.num_clients=3", "data.synthetic_train=300", "data.synthetic_test=100", "data.personal_test_size=50",
         "federated.rounds=2", "federated.local_epochs=1", "gate.rounds=2", "expert.epochs=2",
         'stage1.methods=["fedce"]', 'gate.methods=["rangate", "rollgate", "fedavggate", "fedgate", "localgate"]',
         "baselines.methods=[]"]


def small_config(*extra: str) -> config.Config:
    return config.load(ROOT / "configs" / "tiny.toml", [*SMALL, *extra])


@dataclass
class Wire:
    """Everything that crossed between the server and the devices (copied, as a wire copies)."""

    arrays: list[np.ndarray] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    fail: dict[tuple[str, int], int] = field(default_factory=dict)  # (operation, device) -> failures left

    def send(self, params: Params) -> Params:
        copied = {k: np.array(v, copy=True) for k, v in params.items()}
        self.arrays += copied.values()
        return copied

    def call(self, op: str, cid: int) -> None:
        self.calls.append(op)
        if self.fail.get((op, cid), 0) > 0:
            self.fail[(op, cid)] -= 1
            raise ConnectionError(f"device {cid} dropped off during {op}")


@dataclass
class EvaluatorProxy:
    inner: Evaluator
    wire: Wire
    op: str

    @property
    def cid(self) -> int:
        return self.inner.cid

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        self.wire.call(f"{self.op}.evaluate", self.cid)
        res = self.inner.evaluate(EvaluateIns(ins.round, self.wire.send(ins.params)))
        return EvaluateRes(res.num_examples, dict(res.metrics))


@dataclass
class ClientProxy(EvaluatorProxy):
    inner: Client

    def fit(self, ins: FitIns) -> FitRes:
        self.wire.call(f"{self.op}.fit", self.cid)
        res = self.inner.fit(FitIns(ins.round, self.wire.send(ins.params), ins.upload, ins.seed))
        return FitRes(self.wire.send(res.params), res.num_examples, dict(res.metrics))


@dataclass
class DeviceProxy:
    """A device reached over a 'network': the documented operations only."""

    inner: SimDevice
    wire: Wire

    @property
    def cid(self) -> int:
        return self.inner.cid

    def stage1(self, method: str) -> Client:
        return ClientProxy(self.inner.stage1(method), self.wire, "stage1")

    def use_extractor(self, ins: ExtractorIns) -> Report:
        self.wire.call("use_extractor", self.cid)
        return self.inner.use_extractor(ExtractorIns(ins.stage1, self.wire.send(ins.extractor)))

    def train_expert(self, ins: ExpertIns) -> Report:
        self.wire.call("train_expert", self.cid)
        return self.inner.train_expert(ins)

    def prepare_gate(self, ins: GateDataIns) -> Report:
        self.wire.call("prepare_gate", self.cid)
        return self.inner.prepare_gate(ins)

    def gate(self, stage1: str, gate: str) -> Client:
        return ClientProxy(self.inner.gate(stage1, gate), self.wire, gate)

    def random_gate(self, stage1: str) -> Evaluator:
        return EvaluatorProxy(self.inner.random_gate(stage1), self.wire, "rangate")


def networked(cfg: config.Config, checkpoints: Path, wire: Wire, data: object = None) -> tuple[NMoERecipe, Pipeline]:
    """The recipe over proxies of fresh simulated devices, asked concurrently (ThreadPool); the
    pipeline's recipe class, which adds toolkit.gates' methods and ceilings to NMoERecipe."""
    sim = Pipeline(cfg, checkpoints, show_progress=False, data=data)
    proxies: list[Device] = [DeviceProxy(d, wire) for d in sim.devices]
    return GatesRecipe(cfg, proxies, sim.models, checkpoints, executor=ThreadPool(), show_progress=False), sim


def test_over_a_network_the_recipe_gives_the_simulations_numbers_and_no_private_tensor_crosses(tmp_path: Path) -> None:
    cfg = small_config()
    local = Pipeline(cfg, tmp_path / "local", show_progress=False)
    expected = local.recipe.nmoe("fedce")

    wire = Wire()
    recipe, sim = networked(cfg, tmp_path / "net", wire, data=local.fd)
    assert not any(isinstance(d, Simulated) for d in recipe.devices)
    got = recipe.nmoe("fedce")
    assert got == expected  # every accuracy, curve point, routing share and byte count
    assert all(m["failures"] == [] for m in got.values())

    # what the devices keep: experts, FedGate's final layers, LocalGate's gates
    private = [d.state(stage2_job("fedce")).get_state() for d in sim.devices]
    private += [{k: v for k, v in d.state(stage3_job("fedce", "fedgate")).get_state().items() if k.startswith("final.")}
                for d in sim.devices]
    private += [d.state(stage3_job("fedce", "localgate")).get_state() for d in sim.devices]
    blob = b"".join(a.tobytes() for a in wire.arrays)
    assert len(blob) > 10_000 and all(len(p) for p in private)
    for params in private:
        for name, value in params.items():
            assert value.tobytes() not in blob, f"private tensor {name} crossed the wire"
    # and the server's checkpoints hold only what is shared
    for job in (stage1_job("fedce"), stage2_job("fedce"), stage3_job("fedce", "fedgate")):
        with np.load(tmp_path / "net" / f"{job}.npz") as z:
            assert all(k.startswith("shared/") or k == "__meta__" for k in z.files), job


def test_a_device_dropping_off_mid_stage_is_retried_or_tolerated_and_recorded(tmp_path: Path) -> None:
    cfg = small_config("gate.min_fit_fraction=0.6", 'gate.methods=["fedgate"]')
    wire = Wire(fail={("train_expert", 1): 1, ("fedgate.fit", 2): 1})
    recipe, _ = networked(cfg, tmp_path, wire)
    (metrics,) = recipe.nmoe("fedce").values()
    failures = {(f["job"], f["op"], f["client"], f["attempt"], f["kind"]) for f in metrics["failures"]}
    assert failures == {("stage2_fedce", "train_expert", 1, 0, "error"), ("stage3_fedce_fedgate", "fit", 2, 0, "error")}
    assert wire.calls.count("train_expert") == 4  # three devices, one asked again
    assert len(metrics["per_client"]) == 3 and len(metrics["curve"]) == 2
    assert all("dropped off" in f["reason"] for f in metrics["failures"])


def test_stage_2_needs_every_device(tmp_path: Path) -> None:
    cfg = small_config("expert.retries=1")
    recipe, _ = networked(cfg, tmp_path, Wire(fail={("train_expert", 2): 5}))
    with pytest.raises(NoQuorumError, match=r"stage2_fedce: train_expert needs every device; 1 failed in 2 .*device 2"):
        recipe.nmoe("fedce")


GOLDEN = Path(__file__).parent / "golden" / "tiny_run_metrics.json"


def test_nmoe_train_still_gives_the_numbers_recorded_before_the_round_loop_changed(run_dir: Path) -> None:
    """conftest's tiny run against the numbers the previous round loop gave for it (same seeds).

    Byte counts must match anywhere; accuracies are exact floats of torch's CPU kernels, compared only
    on the CPU and torch version they were recorded with."""
    golden = json.loads(GOLDEN.read_text())
    methods = json.loads((run_dir / "metrics.json").read_text())["methods"]
    assert set(methods) == set(golden["methods"])
    for name, old in golden["methods"].items():
        assert methods[name].get("failures", []) == []
        for key in ("upload_bytes", "download_bytes"):
            assert methods[name][key] == old[key], (name, key)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    if (cpu, torch.__version__) != (golden["cpu"], golden["torch"]):
        pytest.skip(f"accuracies were recorded on {golden['cpu']} with torch {golden['torch']}")
    for name, old in golden["methods"].items():  # every recorded metric unchanged (metrics added since, e.g.
        assert {k: methods[name][k] for k in old} == old, name  # the routing ceilings, may come on top)
