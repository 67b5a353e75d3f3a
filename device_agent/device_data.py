"""A device's own labelled data for federated training: one torch-free `.npz` file (docs/federated.md).

Keys: `train_x` uint8 [N, C, H, W] and `train_y` int64 [N] (what the device trains on), `test_x`
and `test_y` (its personalized test split), optionally `global_x` and `global_y` (a public,
balanced test set, for the global accuracy), and `meta`: a JSON object (format, version, client
id, dataset name, input shape, pixel scale, per-channel mean and std, class names). Loading never
unpickles (allow_pickle=False) and checks every key, dtype and shape; any problem is one
DeviceDataError naming the file.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

FORMAT = "nmoe-device-data"
VERSION = 1
_MAX_META = 65_536


class DeviceDataError(ValueError):
    """A device data file that cannot be used (the message names the file and the problem)."""


@dataclass(frozen=True)
class Split:
    """Raw images and labels."""

    x: np.ndarray  # uint8 [N, C, H, W]
    y: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class DeviceData:
    """What one device trains and evaluates on."""

    client: int
    dataset: str
    input_shape: tuple[int, int, int]
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    train: Split
    test: Split
    global_test: Split | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def normalized(self, x: np.ndarray) -> np.ndarray:
        """float32 inputs of the extractor: (pixel * scale - mean[c]) / std[c] (as the bundle says)."""
        mean = np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(1, -1, 1, 1)
        return ((x.astype(np.float32) * np.float32(self.scale)) - mean) / std


def write_device_data(path: Path, data: DeviceData) -> None:
    """Write `data` atomically (temp file + rename)."""
    meta = {"format": FORMAT, "version": VERSION, "client": data.client, "dataset": data.dataset,
            "input_shape": list(data.input_shape), "scale": data.scale, "mean": list(data.mean),
            "std": list(data.std), "class_names": list(data.class_names)}
    arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta)), "train_x": data.train.x,
                                     "train_y": data.train.y, "test_x": data.test.x, "test_y": data.test.y}
    if data.global_test is not None:
        arrays |= {"global_x": data.global_test.x, "global_y": data.global_test.y}
    _check(path, data)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        np.savez(f, **cast(dict[str, Any], arrays))  # numpy stubs type **kwds like allow_pickle
    os.replace(tmp, path)


def load_device_data(path: Path) -> DeviceData:
    """Read and check a device data file; DeviceDataError on any problem."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise DeviceDataError(f"{path}: no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DeviceDataError(f"{path}: not a readable .npz device data file ({e})") from None
    meta = _meta(path, arrays.get("meta"))
    try:
        shape = tuple(int(v) for v in meta["input_shape"])
        data = DeviceData(
            client=int(meta["client"]), dataset=str(meta["dataset"]), input_shape=(shape[0], shape[1], shape[2]),
            scale=float(meta["scale"]), mean=tuple(float(v) for v in meta["mean"]),
            std=tuple(float(v) for v in meta["std"]), class_names=tuple(str(v) for v in meta["class_names"]),
            train=_split(path, arrays, "train"), test=_split(path, arrays, "test"),
            global_test=_split(path, arrays, "global") if "global_x" in arrays else None)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise DeviceDataError(f"{path}: bad meta or arrays ({type(e).__name__}: {e})") from None
    _check(path, data)
    return data


def _meta(path: Path, raw: np.ndarray | None) -> dict[str, Any]:
    if raw is None or raw.dtype.kind != "U" or raw.ndim != 0 or len(str(raw)) > _MAX_META:
        raise DeviceDataError(f"{path}: missing or bad `meta` (a JSON string)")
    try:
        meta = json.loads(str(raw))
    except ValueError:
        raise DeviceDataError(f"{path}: `meta` is not JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DeviceDataError(f"{path}: not a device data file (meta.format != {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise DeviceDataError(f"{path}: device data version {meta.get('version')!r}; this agent reads {VERSION}")
    return meta


def _split(path: Path, arrays: dict[str, np.ndarray], name: str) -> Split:
    if f"{name}_x" not in arrays or f"{name}_y" not in arrays:
        raise DeviceDataError(f"{path}: missing {name}_x / {name}_y")
    return Split(arrays[f"{name}_x"], arrays[f"{name}_y"])


def _check(path: Path, d: DeviceData) -> None:
    """Dtypes, shapes, label range and normalization constants."""
    channels = d.input_shape[0]
    if len(d.mean) != channels or len(d.std) != channels or not all(s > 0 for s in d.std):
        raise DeviceDataError(f"{path}: mean/std must have {channels} values, std > 0")
    if not (d.scale > 0 and np.isfinite(d.scale)) or d.num_classes < 2:
        raise DeviceDataError(f"{path}: bad scale or fewer than 2 classes")
    for name, split in (("train", d.train), ("test", d.test), ("global", d.global_test)):
        if split is None:
            continue
        if split.x.dtype != np.uint8 or split.x.shape[1:] != d.input_shape or split.x.ndim != 4:
            raise DeviceDataError(f"{path}: {name}_x must be uint8 [N, {', '.join(map(str, d.input_shape))}], "
                                  f"got {split.x.dtype} {list(split.x.shape)}")
        if split.y.dtype != np.int64 or split.y.shape != (len(split.x),):
            raise DeviceDataError(f"{path}: {name}_y must be int64 [{len(split.x)}]")
        if len(split.y) and not (0 <= split.y.min() and split.y.max() < d.num_classes):
            raise DeviceDataError(f"{path}: {name}_y has labels outside 0..{d.num_classes - 1}")
    if len(d.train) < 2:
        raise DeviceDataError(f"{path}: fewer than 2 training samples")
