"""Parameters as they travel: name -> numpy array (framework-free, so any transport can carry them)."""

from __future__ import annotations

import numpy as np

Params = dict[str, np.ndarray]


def nbytes(params: Params) -> int:
    """Bytes of the tensors themselves (what a transport must carry at minimum)."""
    return int(sum(a.nbytes for a in params.values()))


def weighted_mean(items: list[tuple[Params, int]]) -> Params:
    """FedAvg: example-weighted mean of parameter dicts that share their names."""
    total = sum(n for _, n in items)
    if total <= 0:
        raise ValueError("weighted_mean needs at least one client with examples")
    names = items[0][0].keys()
    return {
        name: (sum(p[name].astype(np.float64) * n for p, n in items) / total).astype(items[0][0][name].dtype)
        for name in names
    }
