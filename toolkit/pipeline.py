"""One run of a config: the NMoE recipe on simulated devices, and the baselines, each a resumable job.

The NMoE stages run through the recipe's device operations (toolkit.federated.recipe) on in-process
devices (toolkit.simulation), exactly as the MQTT coordinator runs them on device agents. The
baselines (local, fedavg_ft, centralized) are simulation-only and evaluated here. Stage 1 `fedce`
is FedAvg of extractor + an expert-shaped classifier head with cross-entropy: exactly the `fedavg`
baseline's training, so both read the same job (`stage1_fedce`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit.artifacts import stage1_job
from toolkit.checkpoint import JobStore, run_steps
from toolkit.config import Config
from toolkit.evaluate import client_accuracies, predict
from toolkit.federated import Params
from toolkit.federated.executor import Executor
from toolkit.federated.recipe import failure_rows
from toolkit.federated.summary import ACCURACIES
from toolkit.federated_data import FederatedData, prepare
from toolkit.gates import GateSimDevice, GatesRecipe
from toolkit.models import count_macs, count_params
from toolkit.seeding import derive_seed
from toolkit.simulation import ModelFactory, Place, PublicTest, in_process, sgd
from toolkit.torch_params import set_params
from toolkit.training import SupervisedTask, TensorData

log = logging.getLogger("nmoe")


class Pipeline:
    """Runs every method a config selects; each job checkpoints under `checkpoints/`."""

    def __init__(self, cfg: Config, checkpoints: Path, show_progress: bool = True,
                 data: FederatedData | None = None, executor: Executor | None = None,
                 place: Place = in_process) -> None:
        self.cfg = cfg
        self.checkpoints = checkpoints
        self.show = show_progress
        self.fd = data or prepare(cfg.data)
        self.n = self.fd.num_clients
        self.k = cfg.model.top_k
        self.personal_y = [t.y for t in self.fd.personal_test]
        self.global_y = self.fd.global_test.y
        self.models = ModelFactory.of(cfg, self.fd)
        public = PublicTest(self.fd.global_test)
        self.devices = [GateSimDevice(c, cfg, self.models, self.fd.train[c], self.fd.personal_test[c], public,
                                      self.device, place) for c in range(self.n)]
        self.recipe = GatesRecipe(cfg, self.devices, self.models, checkpoints, executor, show_progress=show_progress)

    def device(self, cid: int) -> GateSimDevice:
        """A device's peers reach it directly (on a fleet: over MQTT)."""
        return self.devices[cid]

    def store(self, job: str) -> JobStore:
        return JobStore(self.checkpoints, job)

    # ---- evaluation helpers (baselines: the server holds their models) -----------------------
    def shared_model_accuracy(self, model: nn.Module) -> dict[str, Any]:
        """Accuracy of one model used by every client."""
        global_scores = predict(model, self.fd.global_test.x)
        return client_accuracies(
            self.n, self.personal_y, self.global_y,
            lambda c, which: predict(model, self.fd.personal_test[c].x) if which == "personal" else global_scores)

    def per_client_model_accuracy(self, models: list[nn.Module]) -> dict[str, Any]:
        """Accuracy when client c uses models[c]."""
        return client_accuracies(
            self.n, self.personal_y, self.global_y,
            lambda c, which: predict(models[c], self.fd.personal_test[c].x if which == "personal"
                                     else self.fd.global_test.x))

    # ---- baselines ---------------------------------------------------------------------------
    def local(self) -> dict[str, Any]:
        b, f = self.cfg.baselines, self.cfg.federated
        task = SupervisedTask(self.models.dense, b.local_epochs, f.batch_size, sgd(f))
        init = self.models.initial("fedce")
        done = run_steps(self.store("baseline_local"), self.n,
                         lambda c, _p: task.fit(init, self.fd.train[c], derive_seed(self.cfg.seed, "local", c)),
                         "baseline_local", "client", self.show)
        result = self.per_client_model_accuracy([set_params(self.models.dense(), p) for p, _ in done])
        return {**result, "upload_bytes": 0, "download_bytes": 0}

    def fedavg(self) -> dict[str, Any]:
        res = self.recipe.stage1("fedce")
        result = self.shared_model_accuracy(set_params(self.models.dense(), res.shared))
        return {**result, "upload_bytes": res.ledger.total("up"), "download_bytes": res.ledger.total("down"),
                "curve": res.curve, "failures": failure_rows(stage1_job("fedce"), res.ledger.failures)}

    def fedavg_ft(self) -> dict[str, Any]:
        b, f = self.cfg.baselines, self.cfg.federated
        res = self.recipe.stage1("fedce")
        task = SupervisedTask(self.models.dense, b.finetune_epochs, f.batch_size, sgd(f, b.finetune_lr))
        done = run_steps(self.store("baseline_fedavg_ft"), self.n,
                         lambda c, _p: task.fit(res.shared, self.fd.train[c], derive_seed(self.cfg.seed, "ft", c)),
                         "baseline_fedavg_ft", "client", self.show)
        result = self.per_client_model_accuracy([set_params(self.models.dense(), p) for p, _ in done])
        return {**result, "upload_bytes": res.ledger.total("up"), "download_bytes": res.ledger.total("down"),
                "failures": failure_rows(stage1_job("fedce"), res.ledger.failures)}

    def centralized(self) -> dict[str, Any]:
        """Pooled data (a reference, not federated): upload = the raw training data, download = the model."""
        b, f = self.cfg.baselines, self.cfg.federated
        pooled = TensorData(torch.cat([t.x for t in self.fd.train]), torch.cat([t.y for t in self.fd.train]))
        task = SupervisedTask(self.models.dense, 1, f.batch_size, sgd(f))

        def epoch(i: int, prev: Params | None) -> tuple[Params, dict[str, float]]:
            params, _ = task.fit(prev or self.models.initial("fedce"), pooled, derive_seed(self.cfg.seed, "central", i))
            accuracies = self.shared_model_accuracy(set_params(self.models.dense(), params))
            return params, {"round": i + 1, **{k: accuracies[k] for k in ACCURACIES}}

        done = run_steps(self.store("baseline_centralized"), b.centralized_epochs, epoch,
                         "baseline_centralized", "epoch", self.show)
        final = done[-1][0]
        result = self.shared_model_accuracy(set_params(self.models.dense(), final))
        raw_bytes = sum(t.x[0].numel() * len(t) + len(t) for t in self.fd.train)  # uint8 pixels + 1-byte labels
        model_bytes = sum(a.nbytes for a in final.values())
        return {**result, "upload_bytes": raw_bytes, "download_bytes": model_bytes * self.n,
                "curve": [m for _, m in done]}

    # ---- the whole run -----------------------------------------------------------------------
    def compute(self) -> dict[str, Any]:
        """MACs per sample and parameter counts: one NMoE device vs a centralized MoE vs dense."""
        m, models = self.cfg.model, self.models
        parts: dict[str, tuple[nn.Module, tuple[int, ...]]] = {
            "extractor": (models.extractor(), self.fd.splits.input_shape),
            "gate": (models.gate(), (m.latent_dim,)),
            "expert": (models.expert(), (m.latent_dim,)),
            "dense": (models.dense(), self.fd.splits.input_shape),
        }
        p = {name: {"macs": count_macs(mod, shape), "params": count_params(mod)} for name, (mod, shape) in parts.items()}
        ext, gate, exp = p["extractor"], p["gate"], p["expert"]
        base = {key: ext[key] + gate[key] for key in ("macs", "params")}
        return {"parts": p, "per_device": {
            "nmoe": {"macs": base["macs"] + exp["macs"], "params": base["params"] + exp["params"],
                     "note": "on each device: extractor + gate + its own expert; the k-1 peer experts run on peers"},
            "nmoe_distributed_total": {
                "macs": base["macs"] + self.k * exp["macs"], "params": base["params"] + exp["params"],
                "note": f"fleet-wide compute of one inference (top-{self.k} experts); params per device"},
            "centralized_moe": {
                "macs": base["macs"] + self.k * exp["macs"], "params": base["params"] + self.n * exp["params"],
                "note": f"one device holding the extractor, gate and all {self.n} experts"},
            "dense": {**{k: p["dense"][k] for k in ("macs", "params")},
                      "note": "the local/fedavg model: extractor + one classifier head"},
        }}

    def run(self) -> dict[str, dict[str, Any]]:
        """Metrics of every selected method, in the order baselines then NMoE."""
        methods: dict[str, dict[str, Any]] = {}
        for name in self.cfg.baselines.methods:
            log.info("baseline %s", name)
            methods[name] = getattr(self, name)()
        for method in self.cfg.stage1.methods:
            if self.cfg.gate.methods:
                log.info("nmoe stage 1 = %s", method)
                methods.update(self.recipe.nmoe(method))
        return methods
