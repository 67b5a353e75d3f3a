"""Batched image augmentations for contrastive learning (SimCLR-style views), on normalized tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_view(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random view per image: crop-zoom, shift, horizontal flip, contrast/brightness, cutout."""
    b = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=gen)

    scale = u(0.75, 1.0)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = scale * flip
    theta[:, 1, 1] = scale
    theta[:, 0, 2] = u(-0.15, 0.15)
    theta[:, 1, 2] = u(-0.15, 0.15)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    out = out * u(0.6, 1.4).view(b, 1, 1, 1) + u(-0.4, 0.4).view(b, 1, 1, 1)
    return _cutout(out, gen)


def _cutout(x: torch.Tensor, gen: torch.Generator, p: float = 0.5, max_frac: float = 0.4) -> torch.Tensor:
    b, _, h, w = x.shape
    size = (torch.rand(b, generator=gen) * max_frac * min(h, w)).long().view(b, 1, 1)
    cy = torch.randint(0, h, (b, 1, 1), generator=gen)
    cx = torch.randint(0, w, (b, 1, 1), generator=gen)
    ys = torch.arange(h).view(1, h, 1)
    xs = torch.arange(w).view(1, 1, w)
    box = ((ys - cy).abs() <= size // 2) & ((xs - cx).abs() <= size // 2)
    apply = (torch.rand(b, generator=gen) < p).view(b, 1, 1)
    return x.masked_fill((box & apply).unsqueeze(1), 0.0)


def nt_xent(p1: torch.Tensor, p2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalized-temperature cross-entropy over a batch of positive pairs (p1[i], p2[i])."""
    n = p1.shape[0]
    z = F.normalize(torch.cat([p1, p2]), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, targets)
