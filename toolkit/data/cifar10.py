"""CIFAR-10 from the original python-pickle batches, through a restricted unpickler."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.data.dataset import ArrayDataset, DataError, DatasetSplits

FOLDER_NAME = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
NUM_CLASSES = 10
ROW_BYTES = 3 * 32 * 32
_ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
})


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only; any other global raises DataError."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise DataError(f"CIFAR-10: refusing to unpickle {module}.{name} from {self._path}")
        return super().find_class(module, name)


def _error(path: Path, problem: str) -> DataError:
    return DataError(f"CIFAR-10: {path} {problem}")


def _unpickle(path: Path) -> dict[bytes, Any]:
    """The dict stored in one batch file."""
    if not path.is_file():
        raise _error(path, f"is missing (expected a pickled batch of the python version in "
                           f"'{FOLDER_NAME}')")
    try:
        with path.open("rb") as f:
            obj = _RestrictedUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as e:  # a corrupt pickle can fail in many ways
        raise _error(path, f"is not a readable pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise _error(path, f"holds a {type(obj).__name__} (expected a dict)")
    return obj


def _field(batch: dict[bytes, Any], key: bytes, path: Path) -> Any:
    if key not in batch:
        raise _error(path, f"has no key {key!r} (keys: {sorted(batch)})")
    return batch[key]


def _load_batch(path: Path) -> ArrayDataset:
    """One batch: rows of 1024 R, 1024 G, 1024 B bytes -> x [N, 3, 32, 32]."""
    batch = _unpickle(path)
    data = _field(batch, b"data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != ROW_BYTES:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise _error(path, f"has data {shape} {dtype} (expected a uint8 array [N, {ROW_BYTES}])")
    try:
        labels = np.asarray(_field(batch, b"labels", path), dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise _error(path, f"has non-integer labels (expected a list of ints: {e})") from e
    if labels.shape != (len(data),):
        raise _error(path, f"has labels of shape {labels.shape} (expected {len(data)} labels)")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise _error(path, f"has labels outside 0..{NUM_CLASSES - 1}")
    return ArrayDataset(data.reshape(-1, 3, 32, 32).copy(), labels)


def _class_names(path: Path) -> tuple[str, ...]:
    names = _field(_unpickle(path), b"label_names", path)
    if not isinstance(names, list) or len(names) != NUM_CLASSES \
            or not all(isinstance(n, bytes) for n in names):
        raise _error(path, f"has label_names {names!r} (expected {NUM_CLASSES} byte strings)")
    return tuple(n.decode("ascii", "replace") for n in names)


def _resolve_folder(path: Path) -> Path:
    """`path` itself, or its child 'cifar-10-batches-py' if present."""
    child = path / FOLDER_NAME
    return child if child.is_dir() else path


def load_cifar10(path: str | Path) -> DatasetSplits:
    """CIFAR-10 from the folder 'cifar-10-batches-py' (or its parent)."""
    folder = _resolve_folder(Path(path))
    train = [_load_batch(folder / name) for name in TRAIN_BATCHES]
    return DatasetSplits(
        name="cifar10",
        train=ArrayDataset(np.concatenate([b.x for b in train]), np.concatenate([b.y for b in train])),
        test=_load_batch(folder / "test_batch"),
        class_names=_class_names(folder / "batches.meta"),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    )
