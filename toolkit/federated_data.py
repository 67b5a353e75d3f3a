"""A run's data: the dataset partitioned over clients, normalized, with personalized test splits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from device_agent.bundle import InputSpec
from toolkit.config import ConfigError, DataConfig
from toolkit.data import (
    ArrayDataset,
    DatasetSplits,
    label_distribution,
    load_dataset,
    partition,
    personalized_test_indices,
)
from toolkit.seeding import derive_seed
from toolkit.training import TensorData


@dataclass(frozen=True)
class FederatedData:
    """Per-client train and personalized test tensors, plus the full balanced test set."""

    splits: DatasetSplits
    train: list[TensorData]
    personal_test: list[TensorData]
    global_test: TensorData
    label_dist: np.ndarray  # [clients, classes]: each client's training label mix

    @property
    def num_clients(self) -> int:
        return len(self.train)


def dataset_info(splits: DatasetSplits) -> dict[str, Any]:
    """What a device needs to feed the extractor: input shape, normalization, class names."""
    return {"name": splits.name, "input_shape": list(splits.input_shape), "input_dtype": "uint8",
            "scale": 1 / 255, "mean": list(splits.mean), "std": list(splits.std),
            "class_names": list(splits.class_names), "num_classes": splits.num_classes,
            "normalization": "x = (pixel * scale - mean[c]) / std[c], NCHW float32"}


def normalize(ds: ArrayDataset, mean: tuple[float, ...], std: tuple[float, ...]) -> TensorData:
    """uint8 [N,C,H,W] -> float32 normalized per channel."""
    x = torch.from_numpy(ds.x).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return TensorData((x - m) / s, torch.from_numpy(ds.y.astype(np.int64)))


def raw_images(x: torch.Tensor, spec: InputSpec) -> np.ndarray:
    """Normalized float images back to the uint8 pixels they came from (the inverse of `normalize`)."""
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return torch.round((x * std + mean) / spec.scale).clamp(0, 255).to(torch.uint8).numpy()


def stratified_subsample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subsample of size n keeping the label mix."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    take = np.floor(counts / counts.sum() * n).astype(int)
    picked = [rng.choice(np.flatnonzero(labels == c), k, replace=False) for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def drawable(test_labels: np.ndarray, train_labels: np.ndarray) -> int:
    """Test samples of the classes a client holds (the most its personalized split can have)."""
    return int(np.isin(test_labels, np.unique(train_labels)).sum())


def load_splits(cfg: DataConfig) -> DatasetSplits:
    """Load the configured dataset (raises DataError with the path on bad files)."""
    options = {}
    if cfg.dataset == "synthetic":
        options = {"num_train": cfg.synthetic_train, "num_test": cfg.synthetic_test,
                   "image_size": cfg.synthetic_image_size, "seed": cfg.seed}
    return load_dataset(cfg.dataset, cfg.path or None, **options)


def prepare(cfg: DataConfig) -> FederatedData:
    """Load, optionally subsample, partition and normalize; deterministic given cfg.seed."""
    splits = load_splits(cfg)
    train = splits.train
    if cfg.max_train_samples and cfg.max_train_samples < len(train):
        train = train.subset(stratified_subsample(train.y, cfg.max_train_samples, cfg.seed))
    try:
        parts = partition(train.y, cfg.partition, cfg.num_clients, seed=cfg.seed, alpha=cfg.alpha,
                          classes_per_client=cfg.classes_per_client, min_size=cfg.min_client_size)
    except ValueError as e:  # impossible for this dataset (e.g. more clients than samples)
        raise ConfigError(f"data.partition: {e}") from None
    k = splits.num_classes
    tests = [personalized_test_indices(splits.test.y, train.y[idx], k,
                                       min(cfg.personal_test_size, drawable(splits.test.y, train.y[idx])),
                                       derive_seed(cfg.seed, "ptest", c))
             for c, idx in enumerate(parts)]

    def norm(ds: ArrayDataset) -> TensorData:
        return normalize(ds, splits.mean, splits.std)

    return FederatedData(
        splits=splits,
        train=[norm(train.subset(idx)) for idx in parts],
        personal_test=[norm(splits.test.subset(idx)) for idx in tests],
        global_test=norm(splits.test),
        label_dist=np.stack([label_distribution(train.y[idx], k) for idx in parts]),
    )
