"""Per-device bundles from a trained NMoE: model files per format and precision, samples, manifest.

A format (ONNX, ExecuTorch, LiteRT) is a `ModelFormat`: it writes one role's model
in the requested precisions and reports the files' I/O. int8 calibration data is always the
device's own training images (and their latents), never another client's. The manifest, hashes
and the verified swap into place are the device side's writer (device_agent.bundle_writer), the
same one a device uses to rebuild its bundle after federated training.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from device_agent import bundle_writer
from device_agent.bundle import (
    MANIFEST,
    SCHEMA_VERSION,
    SHARED_EXPERT_SCHEMA_VERSION,
    Bundle,
    BundleError,
    InputSpec,
    Manifest,
    SharedExpert,
    TensorSpec,
)
from device_agent.bundle_writer import ModelFile, package_versions, utc_now
from device_agent.model_build import IO_NAMES
from toolkit.artifacts import OOD_GATES, TrainedNMoE, parse_method
from toolkit.evaluate import Router, gate_router, predict
from toolkit.federated.params import Params
from toolkit.federated_data import FederatedData, raw_images
from toolkit.gates.methods import OODScore, fallback_router
from toolkit.models import Expert, Extractor, Gate
from toolkit.progress import progress_bar
from toolkit.run_files import read_metrics
from toolkit.seeding import derive_seed
from toolkit.torch_params import set_params

SELF_CHECK_SAMPLES = 8
_Module = TypeVar("_Module", bound=nn.Module)
PROVENANCE_PACKAGES = ("nmoe-edge", "torch", "onnx", "onnxruntime", "executorch", "litert-torch", "ai-edge-litert")


class ExportError(ValueError):
    """The export cannot proceed (printed as one line by `nmoe export`)."""


@dataclass(frozen=True)
class ModelSource:
    """One role's torch module and its int8 calibration inputs (this device's own data)."""

    role: str
    module: nn.Module
    input_name: str  # the forward() argument name
    output_name: str
    calibration: np.ndarray  # float32 [N, ...]; row 0 is also the export example


@dataclass(frozen=True)
class WrittenModel:
    """A model file a format wrote, with its I/O as the file declares it."""

    precision: str
    path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class ModelFormat(Protocol):
    """An export format: writes `<role>.<precision>.<suffix>` files into a bundle folder."""

    name: str

    def write(self, source: ModelSource, precisions: Sequence[str], out_dir: Path) -> list[WrittenModel]:
        """Write the model in every precision; int8 calibrates on `source.calibration`."""
        ...


@dataclass(frozen=True)
class DeviceModules:
    """A device's torch models (fp32, eval mode): the reference for every exported file. With a shared
    expert either the gate has one more output than the fleet has experts (the shared expert's) or the
    device's OOD score `ood` weighs the shared expert in (fedgate_ood)."""

    extractor: Extractor
    gate: Gate | None
    expert: Expert
    shared_expert: Expert | None = None
    ood: OODScore | None = None

    def router(self, top_k: int, num_experts: int) -> Router:
        """The device's torch routing as the run evaluated it (gate routing only)."""
        assert self.gate is not None
        route = gate_router(self.gate, top_k)
        return route if self.ood is None else fallback_router(route, self.ood, num_experts)

    def roles(self) -> dict[str, nn.Module]:
        """Every model of the bundle by role (latent -> output except the extractor)."""
        roles: dict[str, nn.Module | None] = {"extractor": self.extractor, "gate": self.gate, "expert": self.expert,
                                              "shared_expert": self.shared_expert}
        return {role: m for role, m in roles.items() if m is not None}

    def sources(self, images: torch.Tensor) -> list[ModelSource]:
        """Export sources; gate and experts calibrate on the latents of the same images."""
        z = predict(self.extractor, images)
        return [ModelSource(role, m, *IO_NAMES[role], (images if role == "extractor" else z).numpy())
                for role, m in self.roles().items()]


def device_modules(trained: TrainedNMoE) -> list[DeviceModules]:
    """Every device's models as torch modules."""
    m, ds = trained.config.model, trained.dataset
    shape = tuple(ds["input_shape"])

    def build(module: _Module, params: Params) -> _Module:
        set_params(module, params)
        return module.eval()

    def expert(params: Params) -> Expert:
        return build(Expert(m.latent_dim, m.expert_hidden, ds["num_classes"]), params)

    return [DeviceModules(
        build(Extractor(shape, m.width, m.latent_dim), d.extractor),
        None if d.gate is None else build(Gate(m.latent_dim, m.gate_hidden, len(d.gate["final.bias"])), d.gate),
        expert(d.expert), None if d.shared_expert is None else expert(d.shared_expert))
        for d in trained.devices]


def with_ood_scores(trained: TrainedNMoE, modules: list[DeviceModules], data: FederatedData) -> list[DeviceModules]:
    """For fedgate_ood, every device's OOD score, fitted on its own training latents exactly as its
    simulated device did (toolkit.gates.device.GateSimDevice.prepare_ood: same data, split and seed)."""
    if parse_method(trained.method)[1] not in OOD_GATES:
        return modules
    g, seed, classes = trained.config.gate, trained.config.seed, trained.dataset["num_classes"]
    return [dataclasses.replace(mods, ood=OODScore.fit(
        predict(mods.extractor, data.train[c].x), data.train[c].y, classes, g.heldout_fraction, g.ood_quantile,
        g.ood_temperature, derive_seed(seed, "ood", c))) for c, mods in enumerate(modules)]


def ood_tensors(score: OODScore) -> dict[str, np.ndarray]:
    """What a device needs to compute the score (ood.npz, docs/bundle.md)."""
    return {"means": score.maha.means.numpy(), "precision": score.maha.precision.numpy(),
            "tau": np.array(score.tau), "spread": np.array(score.spread), "temperature": np.array(score.temperature)}


def input_spec(dataset: dict[str, Any]) -> InputSpec:
    """The manifest's input section from the run dir's dataset.json."""
    return InputSpec(shape=list(dataset["input_shape"]), dtype="uint8", scale=dataset["scale"],
                     mean=list(dataset["mean"]), std=list(dataset["std"]), layout="NCHW")


def calibration_images(train_x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """A seeded subset of n of this client's own training images (all when it has fewer)."""
    if n >= len(train_x):
        return train_x
    idx = np.sort(np.random.default_rng(seed).choice(len(train_x), n, replace=False))
    return train_x[torch.from_numpy(idx)]


def self_check_samples(mods: DeviceModules, x: torch.Tensor, y: torch.Tensor, spec: InputSpec) -> dict[str, np.ndarray]:
    """Raw images, labels and the fp32 torch outputs a device can compare its own runs against."""
    z = predict(mods.extractor, x)
    samples = {"images": raw_images(x, spec), "labels": y.numpy(), "latent": z.numpy(),
               "expert_probs": torch.softmax(predict(mods.expert, z), dim=-1).numpy()}
    if mods.gate is not None:
        samples["gate_logits"] = predict(mods.gate, z).numpy()
    if mods.shared_expert is not None:
        samples["shared_expert_probs"] = torch.softmax(predict(mods.shared_expert, z), dim=-1).numpy()
    if mods.ood is not None:
        samples["ood_score"] = mods.ood(z).numpy()
    return samples


def provenance(run_dir: Path, trained: TrainedNMoE) -> dict[str, Any]:
    """Where the bundle came from and the package versions that made it."""
    return {"built_by": "export", "run_dir": str(run_dir.resolve()), "method": trained.method,
            "config_hash": trained.config.hash(), "created": utc_now(), "packages": package_versions(PROVENANCE_PACKAGES)}


def best_method(run_dir: Path) -> str:
    """The run's `nmoe_*_fedgate` method with the best personalized accuracy."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise ExportError(f"{run_dir} is not a finished run dir ({path.name} is missing); "
                          f"run `nmoe train CONFIG --out {run_dir}` first")
    methods = read_metrics(run_dir)["methods"]
    fedgate = {name: m["personalized_accuracy"] for name, m in methods.items()
               if name.startswith("nmoe_") and name.endswith("_fedgate")}
    if not fedgate:
        raise ExportError(f"{path} has no nmoe_*_fedgate method; pick one with --method "
                          f"(it has: {', '.join(methods) or 'none'})")
    return str(max(fedgate, key=fedgate.__getitem__))


def write_bundles(trained: TrainedNMoE, modules: list[DeviceModules], data: FederatedData, run_dir: Path,
                  out: Path, formats: Sequence[ModelFormat], precisions: Sequence[str], calibration_samples: int,
                  show_progress: bool = True) -> dict[int, Bundle]:
    """One verified bundle folder `out/device-<c>` per client (replacing any earlier export's); by expert id."""
    out.mkdir(parents=True, exist_ok=True)
    spec = input_spec(trained.dataset)
    origin = provenance(run_dir, trained)
    bundles = {}
    with progress_bar(len(modules), "export", "device", show_progress) as bar:
        for c, mods in enumerate(modules):
            images = calibration_images(data.train[c].x, calibration_samples,
                                        derive_seed(trained.config.seed, "calibration", c))
            test = data.personal_test[c]
            manifest = partial_manifest(trained, c, spec, origin)
            bundles[c] = write_bundle(
                out / manifest.device_id, manifest, mods.sources(images), formats, precisions,
                self_check_samples(mods, test.x[:SELF_CHECK_SAMPLES], test.y[:SELF_CHECK_SAMPLES], spec),
                None if mods.ood is None else ood_tensors(mods.ood))
            bar.update(1)
    written = {b.path.name for b in bundles.values()}
    for stale in out.glob("device-*"):  # bundles of an earlier export of a larger fleet
        if stale.name not in written and (stale / MANIFEST).is_file():
            shutil.rmtree(stale)
    return bundles


def partial_manifest(trained: TrainedNMoE, c: int, spec: InputSpec, origin: dict[str, Any]) -> Manifest:
    """Device c's manifest without models and samples (write_bundle fills them in).

    The model version of an export is the run's config hash (what schema 1 bundles implied). A bundle
    with a shared expert is schema 3 (an older agent would not know the gate's last output); others 2.
    """
    ds, n = trained.dataset, len(trained.devices)
    mode = "fallback" if parse_method(trained.method)[1] in OOD_GATES else "routed"  # fallback: write_bundle adds ood
    shared = None if trained.devices[c].shared_expert is None else SharedExpert(index=n, local=True, mode=mode)
    return Manifest(
        schema_version=SCHEMA_VERSION if shared is None else SHARED_EXPERT_SCHEMA_VERSION, model_version=trained.config.hash(), device_id=f"device-{c}", expert_id=c,
        num_experts=n,
        top_k=trained.config.model.top_k, latent_dim=trained.config.model.latent_dim,
        num_classes=ds["num_classes"], class_names=list(ds["class_names"]),
        routing="random" if trained.devices[c].gate is None else "gate", input=spec, models=[],
        provenance=origin, samples=None, shared_expert=shared)


def write_bundle(dest: Path, manifest: Manifest, sources: list[ModelSource], formats: Sequence[ModelFormat],
                 precisions: Sequence[str], samples: dict[str, np.ndarray],
                 ood: dict[str, np.ndarray] | None = None) -> Bundle:
    """Every format's files of every source (and an OOD score's tensors), written and verified by the
    device side's bundle writer."""
    def write_models(folder: Path) -> list[ModelFile]:
        return [ModelFile(s.role, fmt.name, w.precision, w.path, w.inputs, w.outputs)
                for fmt in formats for s in sources for w in fmt.write(s, precisions, folder)]

    try:
        return bundle_writer.write_bundle(dest, manifest, write_models, samples, ood=ood)
    except BundleError as e:
        raise ExportError(str(e)) from None
