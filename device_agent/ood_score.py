"""The OOD score of a shared expert in mode "fallback" (fedgate_ood), in numpy: how much weight an input
gives the shared expert instead of the gate's top-k.

s(z) = sigmoid((d(z) - tau) / (temperature * spread)), d(z) the squared Mahalanobis distance of the
latent to the nearest of the device's own class means under their shared covariance (its inverse is
`precision`). The tensors come from the bundle's ood.npz (docs/bundle.md); the device computes the
score itself, in float32 as the torch evaluation did (toolkit.gates.methods.OODScore).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from device_agent.bundle import OOD_KEYS, Bundle, BundleError


@dataclass(frozen=True)
class OODScore:
    """A device's OOD score: its known class means [K, D], the shared precision [D, D] and the threshold."""

    means: np.ndarray
    precision: np.ndarray
    tau: float
    spread: float
    temperature: float

    @classmethod
    def of(cls, bundle: Bundle) -> OODScore:
        """The bundle's score (BundleError naming ood.npz when a tensor is missing, misshapen or not finite)."""
        tensors = bundle.ood_tensors()
        shared = bundle.manifest.shared_expert
        where = bundle.path / (shared.ood.file if shared and shared.ood else "ood.npz")
        missing = [k for k in OOD_KEYS if k not in tensors]
        if missing:
            raise BundleError(f"{where}: no {', '.join(missing)} (has: {', '.join(sorted(tensors))})")
        d = bundle.manifest.latent_dim
        means, precision = tensors["means"], tensors["precision"]
        scalars = {k: tensors[k] for k in ("tau", "spread", "temperature")}
        if means.ndim != 2 or means.shape[1] != d or len(means) < 1 or precision.shape != (d, d) \
                or any(v.shape != () for v in scalars.values()):
            raise BundleError(f"{where}: expected means [K, {d}], precision [{d}, {d}] and scalar tau, spread, "
                              f"temperature, got {list(means.shape)}, {list(precision.shape)}, "
                              f"{[list(v.shape) for v in scalars.values()]}")
        values = [means, precision, *scalars.values()]
        if not all(np.isfinite(v).all() for v in values) or not float(scalars["spread"]) > 0 \
                or not float(scalars["temperature"]) > 0:
            raise BundleError(f"{where}: not finite, or spread / temperature not > 0")
        return cls(means.astype(np.float32), precision.astype(np.float32), float(scalars["tau"]),
                   float(scalars["spread"]), float(scalars["temperature"]))

    def distance(self, z: np.ndarray) -> np.ndarray:
        """[N] squared Mahalanobis distance to the nearest known class mean."""
        diff = z[:, None, :].astype(np.float32) - self.means[None]  # [N, K, D]
        d: np.ndarray = np.einsum("nkd,de,nke->nk", diff, self.precision, diff).min(axis=1)
        return d

    def __call__(self, z: np.ndarray) -> np.ndarray:
        """[N] float32 score in [0, 1]: ~0 for familiar latents, ~1 for far ones."""
        x = (self.distance(z) - np.float32(self.tau)) / np.float32(self.temperature * self.spread)
        s: np.ndarray = (1 / (1 + np.exp(-x.astype(np.float64)))).astype(np.float32)
        return s
