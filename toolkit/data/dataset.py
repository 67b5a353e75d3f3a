"""Image datasets as uint8 arrays, their train/test splits, and the loader dispatcher."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

DATASET_NAMES = ("fashion_mnist", "cifar10", "synthetic")


class DataError(ValueError):
    """Missing/malformed dataset file; message names the path and what was expected."""


@dataclass(frozen=True)
class ArrayDataset:
    """Images x (uint8 [N, C, H, W]) with labels y (int64 [N])."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise ValueError(f"ArrayDataset needs x [N,C,H,W] and y [N]; got x {self.x.shape}, "
                             f"y {self.y.shape}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> ArrayDataset:
        """The samples at `idx` (an index array or boolean mask)."""
        return ArrayDataset(self.x[idx], self.y[idx])


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's train and test sets with class names and per-channel statistics."""

    name: str
    train: ArrayDataset
    test: ArrayDataset
    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, for pixels scaled to [0, 1]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.x.shape[1:]
        return int(c), int(h), int(w)


def load_dataset(name: str, path: str | None = None, **options: Any) -> DatasetSplits:
    """Load a dataset by name; `path` is its folder (ignored by "synthetic")."""
    from toolkit.data.cifar10 import load_cifar10
    from toolkit.data.idx import load_fashion_mnist
    from toolkit.data.synthetic import load_synthetic

    if name == "fashion_mnist":
        return load_fashion_mnist(path, **options)
    if name == "cifar10":
        if path is None:
            raise DataError("CIFAR-10: no path given (expected the folder 'cifar-10-batches-py' "
                            "or its parent; set data.path)")
        return load_cifar10(path, **options)
    if name == "synthetic":
        return load_synthetic(**options)
    raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")
