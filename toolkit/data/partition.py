"""Splitting a labelled training set over federated clients, and personalized test splits.

Every partition function returns one sorted int64 index array per client into `labels`;
each index belongs to exactly one client, and the result is deterministic given the seed.
"""

from __future__ import annotations

import numpy as np

SCHEMES = ("iid", "dirichlet", "shards")
DIRICHLET_MAX_TRIES = 1000


def _check_labels(labels: np.ndarray, num_clients: int) -> np.ndarray:
    """Validate labels (1-D non-negative ints) and the client count; return labels as int64."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > len(labels):
        raise ValueError(f"more clients ({num_clients}) than samples ({len(labels)})")
    return labels.astype(np.int64, copy=False)


def _finish(parts: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Concatenate and sort each client's index chunks."""
    return [np.sort(np.concatenate(chunks).astype(np.int64)) for chunks in parts]


def partition_iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """Uniformly random split into near-equal parts."""
    labels = _check_labels(labels, num_clients)
    perm = np.random.default_rng(seed).permutation(len(labels))
    return _finish([[chunk] for chunk in np.array_split(perm, num_clients)])


def _dirichlet_once(rng: np.random.Generator, labels: np.ndarray, num_clients: int,
                    alpha: float) -> list[list[np.ndarray]]:
    """One per-class Dirichlet allocation; clients already holding N/num_clients get no more."""
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    sizes = np.zeros(num_clients, dtype=np.int64)
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        open_ = sizes < len(labels) / num_clients
        weights = rng.dirichlet(np.full(num_clients, alpha)) * open_
        if weights.sum() == 0:  # every open client's draw underflowed: spread evenly over them
            weights = open_.astype(np.float64)
        cuts = (np.cumsum(weights / weights.sum()) * len(idx)).astype(np.int64)[:-1]
        for client, chunk in enumerate(np.split(idx, cuts)):
            parts[client].append(chunk)
            sizes[client] += len(chunk)
    return parts


def partition_dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                        min_size: int = 10) -> list[np.ndarray]:
    """Per-class Dirichlet(alpha) split (Hsu et al. 2019), resampled until every client has
    at least `min_size` samples."""
    labels = _check_labels(labels, num_clients)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_size < 0 or min_size * num_clients > len(labels):
        raise ValueError(f"min_size={min_size} is impossible for {num_clients} clients and "
                         f"{len(labels)} samples")
    rng = np.random.default_rng(seed)
    for _ in range(DIRICHLET_MAX_TRIES):
        parts = _dirichlet_once(rng, labels, num_clients, alpha)
        if min(sum(len(c) for c in chunks) for chunks in parts) >= min_size:
            return _finish(parts)
    raise ValueError(f"Dirichlet partition with alpha={alpha} gave some client fewer than "
                     f"min_size={min_size} samples in {DIRICHLET_MAX_TRIES} tries; "
                     f"raise alpha or lower min_size")


def partition_shards(labels: np.ndarray, num_clients: int, classes_per_client: int,
                     seed: int) -> list[np.ndarray]:
    """Each client holds `classes_per_client` classes, dealt round-robin from a seeded
    permutation; each class is split evenly among its holders."""
    labels = _check_labels(labels, num_clients)
    classes = np.unique(labels)
    if not 1 <= classes_per_client <= len(classes):
        raise ValueError(f"classes_per_client must be in [1, {len(classes)}], "
                         f"got {classes_per_client}")
    if num_clients * classes_per_client < len(classes):
        raise ValueError(f"{num_clients} clients x {classes_per_client} classes cannot cover "
                         f"all {len(classes)} classes")
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    slots = np.arange(num_clients * classes_per_client).reshape(num_clients, classes_per_client)
    held = order[slots % len(classes)]  # [clients, classes_per_client], distinct per row
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for cls in classes:
        holders = np.flatnonzero((held == cls).any(axis=1))
        idx = rng.permutation(np.flatnonzero(labels == cls))
        if len(idx) < len(holders):
            raise ValueError(f"class {cls} has {len(idx)} samples but {len(holders)} clients "
                             f"hold it")
        for client, chunk in zip(holders, np.array_split(idx, len(holders))):
            parts[client].append(chunk)
    return _finish(parts)


def partition(labels: np.ndarray, scheme: str, num_clients: int, seed: int, alpha: float = 0.5,
              classes_per_client: int = 2, min_size: int = 10) -> list[np.ndarray]:
    """Dispatch to the "iid", "dirichlet" (alpha, min_size) or "shards" (classes_per_client)
    scheme."""
    if scheme == "iid":
        return partition_iid(labels, num_clients, seed)
    if scheme == "dirichlet":
        return partition_dirichlet(labels, num_clients, alpha, seed, min_size)
    if scheme == "shards":
        return partition_shards(labels, num_clients, classes_per_client, seed)
    raise ValueError(f"unknown partition scheme {scheme!r}; known: {', '.join(SCHEMES)}")


def _class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class counts of `labels`, which must lie in [0, num_classes)."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    return np.bincount(labels.astype(np.int64), minlength=num_classes)


def label_distribution(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Fraction of each class in `labels` (float64 [num_classes], sums to 1)."""
    if len(labels) == 0:
        raise ValueError("label_distribution of an empty label array")
    return _class_counts(labels, num_classes) / len(labels)


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts proportional to `weights` that sum exactly to `total`."""
    quotas = weights / weights.sum() * total
    counts: np.ndarray = np.floor(quotas).astype(np.int64)
    short = total - counts.sum()
    counts[np.argsort(-(quotas - counts), kind="stable")[:short]] += 1
    return counts


def _capped_counts(target: np.ndarray, available: np.ndarray, size: int) -> np.ndarray:
    """Counts proportional to `target` summing to `size`, where a class capped by
    `available` gives all it has and its shortfall goes proportionally to the others."""
    counts = np.zeros(len(target), dtype=np.int64)
    free = target > 0
    while True:
        share = _largest_remainder(target[free], size - counts[~free].sum())
        over = share > available[free]
        if not over.any():
            counts[free] = share
            return counts
        capped = np.flatnonzero(free)[over]
        counts[capped] = available[capped]
        free[capped] = False


def personalized_test_indices(test_labels: np.ndarray, train_labels: np.ndarray,
                              num_classes: int, size: int, seed: int) -> np.ndarray:
    """`size` distinct test indices whose class mix follows `train_labels` (sorted int64)."""
    test_labels = np.asarray(test_labels)
    target = label_distribution(train_labels, num_classes)
    available = _class_counts(test_labels, num_classes)
    drawable = int(available[target > 0].sum())
    if not 0 <= size <= drawable:
        raise ValueError(f"size must be in [0, {drawable}] (test samples of the client's "
                         f"classes), got {size}")
    counts = _capped_counts(target, available, size)
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(test_labels == k), n, replace=False)
              for k, n in enumerate(counts) if n]
    return np.sort(np.concatenate(picked)).astype(np.int64) if picked else np.zeros(0, np.int64)
