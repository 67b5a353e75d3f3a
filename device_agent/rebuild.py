"""A device rebuilds its own bundle from new weights, without torch (ONNX only).

After federated training the device has new weights for the shared extractor (from the
coordinator), its private gate and its private expert. `rebuild_bundle` turns them into ONNX
files (device_agent.model_build), static int8 re-calibrated on the device's own images
(device_agent.quantize), fresh self-check samples and a manifest with the new model version,
written through the one bundle writer: the previous bundle stays in place until the new one has
loaded, verified its hashes and reproduced its samples in ONNX Runtime. Other formats of the
previous bundle (LiteRT, ExecuTorch) are dropped, not carried over stale: converting to them
needs torch. docs/bundle.md, "Rebuilt on the device".
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from device_agent.bundle import (
    MANIFEST,
    PRECISIONS,
    SCHEMA_VERSION,
    Bundle,
    BundleError,
    InputSpec,
    Manifest,
    ModelEntry,
)
from device_agent.bundle_writer import ModelFile, package_versions, utc_now, write_bundle
from device_agent.model_build import IO_NAMES, ModelBuildError, Weights, build_model, tensor_specs
from device_agent.nmoe_local import preprocess, softmax
from device_agent.quantize import quantize_int8
from device_agent.runtime import OnnxRuntime
from device_agent.selfcheck import check_bundle

FORMAT = "onnx"
REBUILT_ROLES = ("extractor", "gate", "expert")  # what federated training gives new weights for
PROVENANCE_PACKAGES = ("nmoe-edge", "numpy", "onnx", "onnxruntime")


@dataclass(frozen=True)
class DeviceSpec:
    """What a bundle says about its device besides the models: enough to rebuild one from scratch."""

    device_id: str
    expert_id: int
    num_experts: int
    top_k: int
    class_names: list[str]
    routing: str  # "gate" or "random" (no gate)
    input: InputSpec

    @classmethod
    def of(cls, manifest: Manifest) -> DeviceSpec:
        """The spec of an existing bundle."""
        m = manifest
        return cls(m.device_id, m.expert_id, m.num_experts, m.top_k, list(m.class_names), m.routing, m.input)


@dataclass(frozen=True)
class NewWeights:
    """A device's weights after training, by torch state-dict name; `gate` is None for routing "random"."""

    extractor: Weights
    gate: Weights | None
    expert: Weights

    def of(self, role: str) -> Weights | None:
        """The weights of one role."""
        return {"extractor": self.extractor, "gate": self.gate, "expert": self.expert}[role]


@dataclass(frozen=True)
class _Built:
    """One role's fp32 model in memory, with its int8 calibration inputs."""

    role: str
    model: bytes
    calibration: np.ndarray


def rebuild_bundle(dest: str | Path, base: Bundle | DeviceSpec, weights: NewWeights, calibration_images: np.ndarray,
                   *, model_version: str, run_id: str, round_index: int, precisions: Sequence[str] = PRECISIONS,
                   sample_images: np.ndarray | None = None, sample_labels: np.ndarray | None = None,
                   provenance: Mapping[str, Any] | None = None, intra_op_threads: int = 1) -> Bundle:
    """Write the device's new ONNX bundle to `dest` (usually `base.path`) and return it, verified.

    `base` is the current bundle or, from scratch, a DeviceSpec. `calibration_images` are the
    device's own raw uint8 images [N, C, H, W] (about 256): int8 calibrates on them and on their
    fp32 latents. The self-check samples are `sample_images`/`sample_labels`, by default the current
    bundle's. `provenance` adds caller fields (e.g. the coordinator's config hash) to the rebuild's
    own. Raises ModelBuildError for unusable inputs and BundleError when the written bundle does not
    verify; either way the previous bundle at `dest` is left as it was.
    """
    if isinstance(base, Bundle) and base.manifest.shared_expert is not None:
        raise ModelBuildError(
            f"{base.path}: a bundle with a shared expert (schema {base.manifest.schema_version}, e.g. fedgate_vl) "
            "cannot be rebuilt on the device: federated training over MQTT trains gates over the fleet's experts "
            "only; export such a method from a simulated run with `nmoe export`")
    spec = base if isinstance(base, DeviceSpec) else DeviceSpec.of(base.manifest)
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if not precisions or unknown:
        raise ModelBuildError(f"precisions must be a non-empty subset of {', '.join(PRECISIONS)}, got {list(precisions)}")
    images, labels = _samples(base, sample_images, sample_labels)
    calibration = _preprocessed(calibration_images, spec.input, "calibration_images")
    built, samples = _build(spec, weights, calibration, _preprocessed(images, spec.input, "sample_images"),
                            intra_op_threads)
    samples = {"images": images, "labels": labels, **samples}
    previous = base.manifest if isinstance(base, Bundle) else None
    manifest = Manifest(
        schema_version=SCHEMA_VERSION, model_version=model_version, device_id=spec.device_id,
        expert_id=spec.expert_id, num_experts=spec.num_experts, top_k=spec.top_k,
        latent_dim=int(samples["latent"].shape[1]), num_classes=len(spec.class_names),
        class_names=list(spec.class_names), routing=spec.routing, input=spec.input, models=[],
        provenance=_provenance(run_id, round_index, previous, provenance), samples=None)

    def write_models(folder: Path) -> list[ModelFile]:
        return [f for b in built for f in _write_role(b, precisions, folder)]

    def verify(bundle: Bundle) -> None:
        checks, _ = check_bundle(bundle, [FORMAT], precisions)  # FORMAT named: it must run, nothing is skipped
        for check, _ in checks:
            if not (check.passed and np.isfinite(check.max_abs_diff)):
                raise BundleError(f"{bundle.path / MANIFEST}: rebuilt {check.role} {check.precision} does not "
                                  f"reproduce its samples (max abs diff {check.max_abs_diff:.3g})")

    return write_bundle(Path(dest), manifest, write_models, samples, verify)


def _samples(base: Bundle | DeviceSpec, images: np.ndarray | None, labels: np.ndarray | None
             ) -> tuple[np.ndarray, np.ndarray]:
    """The self-check images and labels: given, or the current bundle's."""
    if images is None and labels is None:
        if not isinstance(base, Bundle) or base.manifest.samples is None:
            raise ModelBuildError("sample_images and sample_labels are needed: there is no current bundle "
                                  "with samples to take them from")
        stored = base.samples()
        if "images" not in stored or "labels" not in stored:
            raise BundleError(f"{base.path / 'samples.npz'}: no images and labels to reuse")
        images, labels = stored["images"], stored["labels"]
    if images is None or labels is None:
        raise ModelBuildError("give both sample_images and sample_labels, or neither")
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu" or labels.shape != (len(images),):
        raise ModelBuildError(f"sample_labels must be {len(images)} integer class ids, got {labels.dtype} "
                              f"{list(labels.shape)}")
    return np.asarray(images), labels.astype(np.int64)


def _preprocessed(images: np.ndarray, spec: InputSpec, what: str) -> np.ndarray:
    """The extractor's float input for raw uint8 images (ModelBuildError naming `what`)."""
    try:
        x = preprocess(np.asarray(images), spec)
    except ValueError as e:
        raise ModelBuildError(f"{what}: {e}") from None
    if len(x) == 0:
        raise ModelBuildError(f"{what}: no images")
    return x


def _build(spec: DeviceSpec, weights: NewWeights, calibration: np.ndarray, sample_x: np.ndarray,
           threads: int) -> tuple[list[_Built], dict[str, np.ndarray]]:
    """fp32 models of every role, their int8 calibration inputs and the fp32 sample outputs."""
    if (weights.gate is None) != (spec.routing == "random"):
        raise ModelBuildError(f"routing {spec.routing!r} needs {'no' if spec.routing == 'random' else 'a'} gate, "
                              f"weights have {'none' if weights.gate is None else 'one'}")
    roles = [r for r in REBUILT_ROLES if weights.of(r) is not None]
    models = {r: build_model(r, weights.of(r) or {}, spec.input.shape) for r in roles}
    latent_dim = _io_size(models["extractor"], "outputs")
    expected = {("gate", "inputs"): latent_dim, ("gate", "outputs"): spec.num_experts,
                ("expert", "inputs"): latent_dim, ("expert", "outputs"): len(spec.class_names)}
    for (role, side), size in expected.items():
        if role in models and _io_size(models[role], side) != size:
            raise ModelBuildError(f"{role} weights: {side[:-1]} size {_io_size(models[role], side)}, the device "
                                  f"needs {size}")
    data = {r: m.SerializeToString() for r, m in models.items()}
    run = {r: in_memory_runtime(r, data[r], models[r], threads).run for r in roles}
    latents, sample_latents = run["extractor"](calibration), run["extractor"](sample_x)
    samples = {"latent": sample_latents, "expert_probs": softmax(run["expert"](sample_latents))}
    if "gate" in run:
        samples["gate_logits"] = run["gate"](sample_latents)
    built = [_Built(r, data[r], calibration if r == "extractor" else latents) for r in roles]
    return built, samples


def _io_size(model: onnx.ModelProto, side: str) -> int:
    inputs, outputs = tensor_specs(model)
    return int((inputs if side == "inputs" else outputs)[0].shape[-1])


def in_memory_runtime(role: str, data: bytes, model: onnx.ModelProto, threads: int = 1) -> OnnxRuntime:
    """The agent's ONNX runtime on an in-memory model (`data`: its serialized bytes)."""
    inputs, outputs = tensor_specs(model)
    entry = ModelEntry(role, FORMAT, "fp32", f"{role}.fp32.onnx", hashlib.sha256(data).hexdigest(), len(data),
                       inputs, outputs)
    return OnnxRuntime(data, entry, threads)


def _write_role(built: _Built, precisions: Sequence[str], folder: Path) -> list[ModelFile]:
    """`<role>.<precision>.onnx` files; int8 is quantized from the fp32 file (kept out of the bundle if unlisted)."""
    paths = {p: folder / f"{built.role}.{p}.onnx" for p in precisions}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = paths.get("fp32", Path(tmp) / "fp32.onnx")
        fp32.write_bytes(built.model)
        if "int8" in paths:
            quantize_int8(fp32, paths["int8"], IO_NAMES[built.role][0], built.calibration)
    return [ModelFile(built.role, FORMAT, p, path, *tensor_specs(onnx.load(str(path)))) for p, path in paths.items()]


def _provenance(run_id: str, round_index: int, previous: Manifest | None, extra: Mapping[str, Any] | None
                ) -> dict[str, Any]:
    """Rebuilt on the device at round `round_index` of run `run_id`, from which model version, dropping what."""
    dropped = sorted({e.format for e in previous.models} - {FORMAT}) if previous is not None else []
    return {**(extra or {}), "built_by": "device", "run_id": run_id, "round": round_index,
            "previous_model_version": None if previous is None else previous.model_version,
            "dropped_formats": dropped, "created": utc_now(), "packages": package_versions(PROVENANCE_PACKAGES)}
