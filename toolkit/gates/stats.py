"""Per-class latent statistics: what a device computes from its own latents, how the server pools
them, virtual latents drawn from the pool (CCVR), and the Mahalanobis score of an input.

Sources: Luo et al., "No Fear of Heterogeneity: Classifier Calibration for Federated Learning with
Non-IID Data" (CCVR, NeurIPS 2021) for pooling per-client class means/covariances and sampling
virtual representations; Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution
Samples and Adversarial Attacks" (NeurIPS 2018) for the tied-covariance Mahalanobis score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toolkit.federated import Params

JITTER = 1e-3  # added to covariance diagonals (relative to their mean) before Cholesky / inverse


@dataclass(frozen=True)
class ClassStats:
    """Counts [C], means [C, D] and covariances [C, D, D] (zero where a class has < 2 samples)."""

    count: torch.Tensor
    mean: torch.Tensor
    cov: torch.Tensor

    @property
    def present(self) -> torch.Tensor:
        """[C] bool: classes with at least two samples (a mean and a covariance)."""
        return self.count >= 2


def class_stats(z: torch.Tensor, y: torch.Tensor, num_classes: int) -> ClassStats:
    """Per-class count, mean and (biased, maximum-likelihood) covariance of latents z [N, D]."""
    d = z.shape[1]
    count = torch.bincount(y, minlength=num_classes).double()
    mean, cov = torch.zeros(num_classes, d, dtype=torch.float64), torch.zeros(num_classes, d, d, dtype=torch.float64)
    for c in range(num_classes):
        zc = z[y == c].double()
        if len(zc) >= 2:
            mean[c] = zc.mean(0)
            centered = zc - mean[c]
            cov[c] = centered.T @ centered / len(zc)
        elif len(zc) == 1:
            mean[c] = zc[0]
    return ClassStats(count, mean, cov)


def pool(parts: list[ClassStats]) -> ClassStats:
    """Exact statistics of the union of the clients' latents from their per-class moments (CCVR eq. 3-4)."""
    count = sum(p.count for p in parts)
    assert isinstance(count, torch.Tensor)  # parts is never empty
    safe = count.clamp_min(1).view(-1, 1)
    mean = sum(p.count.view(-1, 1) * p.mean for p in parts) / safe
    second = sum(p.count.view(-1, 1, 1) * (p.cov + p.mean.unsqueeze(2) * p.mean.unsqueeze(1)) for p in parts)
    cov = second / safe.view(-1, 1, 1) - mean.unsqueeze(2) * mean.unsqueeze(1)
    cov[count < 2] = 0
    return ClassStats(count, mean, cov)


def to_params(stats: ClassStats, diagonal: bool) -> Params:
    """What a client uploads: counts, means and the covariances' upper triangles (or diagonals), fp32."""
    d = stats.mean.shape[1]
    if diagonal:
        spread = torch.diagonal(stats.cov, dim1=1, dim2=2)
    else:
        rows, cols = torch.triu_indices(d, d)
        spread = stats.cov[:, rows, cols]
    return {"count": stats.count.float().numpy(), "mean": stats.mean.float().numpy(),
            "cov": spread.float().numpy()}


def from_params(params: Params, dim: int) -> ClassStats:
    """Inverse of to_params (a diagonal upload gives diagonal covariances)."""
    count = torch.from_numpy(params["count"]).double()
    mean = torch.from_numpy(params["mean"]).double()
    spread = torch.from_numpy(params["cov"]).double()
    cov = torch.zeros(len(count), dim, dim, dtype=torch.float64)
    if spread.shape[1] == dim:
        cov = torch.diag_embed(spread)
    else:
        rows, cols = torch.triu_indices(dim, dim)
        cov[:, rows, cols] = spread
        cov = cov + cov.transpose(1, 2) - torch.diag_embed(torch.diagonal(cov, dim1=1, dim2=2))
    return ClassStats(count, mean, cov)


def regularized(cov: torch.Tensor) -> torch.Tensor:
    """cov + JITTER * mean(diag) * I, so that it is positive definite."""
    d = cov.shape[-1]
    scale = torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-6)
    return cov + JITTER * scale[..., None, None] * torch.eye(d, dtype=cov.dtype)


def sample_virtual(stats: ClassStats, per_class: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Virtual latents: per_class[c] draws from N(mean_c, cov_c) for every class with statistics."""
    gen = torch.Generator().manual_seed(seed)
    zs, ys = [], []
    for c in torch.nonzero(stats.present & (per_class > 0)).flatten().tolist():
        chol = torch.linalg.cholesky(regularized(stats.cov[c]))
        eps = torch.randn(int(per_class[c]), stats.mean.shape[1], generator=gen, dtype=torch.float64)
        zs.append(stats.mean[c] + eps @ chol.T)
        ys.append(torch.full((int(per_class[c]),), c, dtype=torch.long))
    if not zs:
        return torch.zeros(0, stats.mean.shape[1]), torch.zeros(0, dtype=torch.long)
    return torch.cat(zs).float(), torch.cat(ys)


@dataclass(frozen=True)
class Mahalanobis:
    """Tied-covariance Mahalanobis distance to the nearest of a device's class means (Lee et al. 2018)."""

    means: torch.Tensor  # [K, D] the device's known classes
    precision: torch.Tensor  # [D, D] inverse of the shared within-class covariance

    @classmethod
    def fit(cls, stats: ClassStats, min_count: int) -> Mahalanobis:
        """From a device's own statistics; classes with fewer than min_count samples are not 'known'."""
        known = stats.count >= max(min_count, 2)
        if not known.any():
            known = stats.present
        w = stats.count[known] / stats.count[known].sum()
        shared = (w.view(-1, 1, 1) * stats.cov[known]).sum(0)
        return cls(stats.mean[known].float(), torch.linalg.inv(regularized(shared)).float())

    def score(self, z: torch.Tensor) -> torch.Tensor:
        """[N] squared distance to the nearest known class mean (large: unfamiliar)."""
        diff = z.unsqueeze(1) - self.means.unsqueeze(0)  # [N, K, D]
        return torch.einsum("nkd,de,nke->nk", diff, self.precision, diff).min(dim=1).values
