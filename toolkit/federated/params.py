"""Parameters as they travel: name -> numpy array (framework-free, so any transport can carry them)."""

from __future__ import annotations

import hashlib

import numpy as np

Params = dict[str, np.ndarray]


def nbytes(params: Params) -> int:
    """Bytes of the tensors themselves (what a transport must carry at minimum)."""
    return int(sum(a.nbytes for a in params.values()))


def digest(params: Params) -> str:
    """sha256 over names, dtypes, shapes and values: equal digests mean equal parameters."""
    h = hashlib.sha256()
    for name in sorted(params):
        a = np.ascontiguousarray(params[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def weighted_mean(items: list[tuple[Params, int]]) -> Params:
    """FedAvg: example-weighted mean of parameter dicts that share their names."""
    total = sum(n for _, n in items)
    if total <= 0:
        raise ValueError("weighted_mean needs at least one client with examples")
    zero = np.zeros((), np.float64)
    return {
        name: (sum((p[name].astype(np.float64) * n for p, n in items), zero) / total).astype(items[0][0][name].dtype)
        for name in items[0][0]
    }
