"""NMoE inference over bundles without torch: extractor -> gate -> top-k -> experts -> combine.

`LocalNMoE` holds every expert in-process. A bundle with a shared expert (schema 3) also uses its own
copy of the shared expert (expert index `num_experts`), which runs on the device like its own expert:
in mode "routed" it is one more gate output; in mode "fallback" it gets weight s(z) of the OOD score
and the gate's top-k the rest (`shared_fallback`). The pieces (`preprocess`, `top_k_route`,
`random_route`, `combine`) are what an MQTT agent calls with remote experts: an `ExpertFn` maps
latents to class probabilities, exactly what an expert response carries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from device_agent.bundle import Bundle, InputSpec
from device_agent.ood_score import OODScore
from device_agent.runtime import Runtime, open_runtime

ExpertFn = Callable[[np.ndarray], np.ndarray]  # latents [n, D] -> class probabilities [n, C]


@dataclass(frozen=True)
class Prediction:
    """NMoE output for a batch of images."""

    labels: np.ndarray  # [N] int64, argmax of probs
    probs: np.ndarray  # [N, C] float32, combined class probabilities
    experts: np.ndarray  # [N, k] int64, chosen expert ids (best first for gate routing)
    weights: np.ndarray  # [N, k] float32, their combine weights (sum to 1)


def preprocess(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 [N, C, H, W] -> float32 (pixel * scale - mean[c]) / std[c]."""
    if images.dtype != np.dtype(spec.dtype) or images.ndim != 4 or list(images.shape[1:]) != spec.shape:
        raise ValueError(f"expected {spec.dtype} images [N, {', '.join(map(str, spec.shape))}] "
                         f"({spec.layout}), got {images.dtype} {list(images.shape)}")
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return (images.astype(np.float32) * np.float32(spec.scale) - mean) / std


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (keeps x's float dtype)."""
    e: np.ndarray = np.exp(x - x.max(axis=-1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return out


def top_k_route(gate_logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest gate logits per row (best first) and their softmax weights."""
    idx = np.argsort(-gate_logits, axis=1, kind="stable")[:, :k]
    return idx, softmax(np.take_along_axis(gate_logits, idx, axis=1))


def random_route(n: int, num_experts: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """RanGate: k distinct experts uniformly at random per input, weights 1/k."""
    idx = rng.random((n, num_experts)).argsort(axis=1)[:, :k]
    return idx, np.full((n, k), 1.0 / k, dtype=np.float32)


def shared_fallback(idx: np.ndarray, weights: np.ndarray, s: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
    """The chosen experts plus the shared expert `index` (last column): their weights times (1 - s), its s."""
    shared = np.full((len(idx), 1), index, dtype=idx.dtype)
    fallback = np.concatenate([(1 - s)[:, None] * weights, s[:, None]], axis=1)
    return np.concatenate([idx, shared], axis=1), fallback.astype(np.float32)


def combine(z: np.ndarray, idx: np.ndarray, weights: np.ndarray, experts: Mapping[int, ExpertFn],
            num_classes: int) -> np.ndarray:
    """sum_k weights[:, k] * expert_idx[:, k](z): each chosen expert is called once on its rows."""
    probs = np.zeros((len(z), num_classes), dtype=np.float32)
    for e in np.unique(idx):
        rows, slot = np.nonzero(idx == e)
        probs[rows] += weights[rows, slot, None] * experts[int(e)](z[rows])
    return probs


class LocalNMoE:
    """A whole fleet's bundles in one process: predict as device `d` with every expert local."""

    def __init__(self, bundles: Mapping[int, Bundle], precision: str, format: str = "onnx",
                 seed: int = 0, intra_op_threads: int = 1) -> None:
        if not bundles:
            raise ValueError("LocalNMoE needs the bundles of every expert, got none")
        first = next(iter(bundles.values()))
        shape = _fleet_shape(first)
        for expert_id, b in bundles.items():
            if b.manifest.expert_id != expert_id:
                raise ValueError(f"{b.path}: holds expert {b.manifest.expert_id}, passed as {expert_id}")
            if _fleet_shape(b) != shape:
                raise ValueError(f"{b.path}: num_experts/top_k/latent_dim/num_classes/gate outputs {_fleet_shape(b)} "
                                 f"differ from {first.path}'s {shape}")
        missing = sorted(set(range(first.manifest.num_experts)) - set(bundles))
        if missing:
            raise ValueError(f"LocalNMoE needs every expert's bundle; missing expert ids {missing}")
        self.bundles = dict(bundles)
        self.num_classes = first.manifest.num_classes
        self.top_k = first.manifest.top_k
        self.num_experts = first.manifest.num_experts

        def runtime(b: Bundle, role: str) -> Runtime:
            return open_runtime(b, b.model(role, precision, format), intra_op_threads)

        self.extractors = {d: runtime(b, "extractor") for d, b in bundles.items()}
        self.gates = {d: runtime(b, "gate") for d, b in bundles.items() if b.manifest.routing == "gate"}
        expert_runtimes = {d: runtime(b, "expert") for d, b in bundles.items()}
        self.experts: dict[int, ExpertFn] = {d: _probabilities(r) for d, r in expert_runtimes.items()}
        self.shared_experts: dict[int, ExpertFn] = {  # by device: each runs its own copy
            d: _probabilities(runtime(b, "shared_expert")) for d, b in bundles.items() if b.manifest.shared_expert}
        self.ood_scores = {d: OODScore.of(b) for d, b in bundles.items()
                           if b.manifest.shared_expert and b.manifest.shared_expert.mode == "fallback"}
        self._rngs = {d: np.random.default_rng([seed, d]) for d in bundles}

    def latents(self, device: int, images: np.ndarray) -> np.ndarray:
        """Device `device`'s extractor on raw uint8 images."""
        return self.extractors[device].run(preprocess(images, self.bundles[device].manifest.input))

    def route(self, device: int, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Chosen experts and weights: the device's gate top-k (over the shared expert too, index
        num_experts, in mode "routed"; plus the shared expert weighted by the OOD score in mode
        "fallback"), or random for a "random" bundle."""
        gate = self.gates.get(device)
        if gate is None:
            return random_route(len(z), self.num_experts, self.top_k, self._rngs[device])
        idx, weights = top_k_route(gate.run(z), self.top_k)
        score = self.ood_scores.get(device)
        return (idx, weights) if score is None else shared_fallback(idx, weights, score(z), self.num_experts)

    def predict(self, device: int, images: np.ndarray) -> Prediction:
        """Classify uint8 images [N, C, H, W] as device `device` would."""
        z = self.latents(device, images)
        idx, weights = self.route(device, z)
        experts = self.experts
        if device in self.shared_experts:
            experts = {**experts, self.num_experts: self.shared_experts[device]}
        probs = combine(z, idx, weights, experts, self.num_classes)
        return Prediction(probs.argmax(axis=1), probs, idx, weights)


def _fleet_shape(b: Bundle) -> tuple[int, int, int, int, int]:
    m = b.manifest
    return m.num_experts, m.top_k, m.latent_dim, m.num_classes, m.gate_outputs


def _probabilities(expert: Runtime) -> ExpertFn:
    return lambda z: softmax(expert.run(z))
