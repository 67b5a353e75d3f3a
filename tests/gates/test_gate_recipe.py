"""toolkit.gates' methods through device operations only, as a network would drive them.

The devices are reached through test_recipe's copying proxies plus the gate methods' operations, so
the server side (GatesRecipe) holds no device and every tensor that crosses is copied and recorded.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from test_recipe import ClientProxy, DeviceProxy, EvaluatorProxy, Wire, small_config

from toolkit.artifacts import stage3_job
from toolkit.federated import Client, Evaluator, ThreadPool
from toolkit.federated.operations import Report
from toolkit.gates import GatesRecipe
from toolkit.gates.device import heldout_job
from toolkit.gates.operations import (
    HeldoutGateIns,
    HeldoutIns,
    OODIns,
    StatsIns,
    StatsReport,
    VirtualGateIns,
    VirtualIns,
)
from toolkit.pipeline import Pipeline

GATES = '["fedgate", "fedgate_ood", "fedgate_vl", "localgate_vl", "fedgate_heldout", "fedgate_switch"]'


@dataclass
class GateDeviceProxy(DeviceProxy):
    """DeviceProxy plus the gate methods' operations (toolkit.gates.operations)."""

    def shared_head(self, stage1: str) -> Client:
        return ClientProxy(self.inner.shared_head(stage1), self.wire, "shared_head")

    def prepare_ood(self, ins: OODIns) -> Report:
        self.wire.call("prepare_ood", self.cid)
        return self.inner.prepare_ood(OODIns(ins.stage1, ins.gate, self.wire.send(ins.head), ins.heldout_fraction,
                                             ins.quantile, ins.temperature, ins.seed))

    def class_stats(self, ins: StatsIns) -> StatsReport:
        self.wire.call("class_stats", self.cid)
        res = self.inner.class_stats(ins)
        return StatsReport(res.num_examples, self.wire.send(res.stats))

    def _virtual(self, ins: VirtualIns) -> VirtualIns:
        return VirtualIns(ins.stage1, self.wire.send(ins.pooled), ins.per_class, ins.seed)

    def virtual_answers(self, ins: VirtualIns) -> np.ndarray:
        self.wire.call("virtual_answers", self.cid)
        return self.wire.send({"a": self.inner.virtual_answers(self._virtual(ins))})["a"]

    def prepare_virtual_gate(self, ins: VirtualGateIns) -> Report:
        self.wire.call("prepare_virtual_gate", self.cid)
        return self.inner.prepare_virtual_gate(VirtualGateIns(
            self._virtual(ins.virtual), ins.gate, self.wire.send({"a": ins.answers})["a"], self.wire.send(ins.head)))

    def train_heldout_expert(self, ins: HeldoutIns) -> Report:
        self.wire.call("train_heldout_expert", self.cid)
        return self.inner.train_heldout_expert(ins)

    def prepare_heldout_gate(self, ins: HeldoutGateIns) -> Report:
        self.wire.call("prepare_heldout_gate", self.cid)
        return self.inner.prepare_heldout_gate(ins)

    def switch_gate(self, stage1: str) -> Evaluator:
        return EvaluatorProxy(self.inner.switch_gate(stage1), self.wire, "fedgate_switch")


def test_over_a_network_the_gate_methods_give_the_simulations_numbers_and_keep_private_tensors(tmp_path: Path) -> None:
    cfg = small_config(f"gate.methods={GATES}", "data.alpha=0.1", "gate.virtual_per_class=20")
    local = Pipeline(cfg, tmp_path / "local", show_progress=False)
    expected = local.recipe.nmoe("fedce")

    wire = Wire()
    sim = Pipeline(cfg, tmp_path / "net", show_progress=False, data=local.fd)
    proxies = [GateDeviceProxy(d, wire) for d in sim.devices]
    got = GatesRecipe(cfg, proxies, sim.models, tmp_path / "net", executor=ThreadPool(), show_progress=False).nmoe("fedce")
    assert got == expected  # accuracies, curves, routing, ceilings, bytes
    assert all(m["failures"] == [] for m in got.values())
    assert {"prepare_ood", "class_stats", "virtual_answers", "prepare_virtual_gate", "train_heldout_expert",
            "prepare_heldout_gate", "fedgate_switch.evaluate"} <= set(wire.calls)

    # what the devices keep: held-out experts, the final layers of fedgate_vl's gates, localgate_vl's gates
    private = [d.state(heldout_job("fedce")).get_state() for d in sim.devices]
    private += [{k: v for k, v in d.state(stage3_job("fedce", "fedgate_vl")).get_state().items()
                 if k.startswith("final.")} for d in sim.devices]
    private += [d.state(stage3_job("fedce", "localgate_vl")).get_state() for d in sim.devices]
    blob = b"".join(a.tobytes() for a in wire.arrays)
    assert all(len(p) for p in private)
    for params in private:
        for name, value in params.items():
            assert value.tobytes() not in blob, f"private tensor {name} crossed the wire"
    with np.load(tmp_path / "net" / f"{heldout_job('fedce')}.npz") as z:  # the server checkpoints no expert
        assert z.files == ["__meta__"]
