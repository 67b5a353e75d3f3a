"""Fashion-MNIST from IDX files (gzipped or plain), strictly validated."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from toolkit.data.dataset import ArrayDataset, DataError, DatasetSplits

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_MAGIC = 0x00000803  # unsigned bytes, 3 dims
LABEL_MAGIC = 0x00000801  # unsigned bytes, 1 dim
IMAGE_SIDE = 28
_HINT = "install the Debian package 'dataset-fashion-mnist' or set data.path"


def _error(path: Path, problem: str) -> DataError:
    return DataError(f"Fashion-MNIST: {path} {problem}")


def _find(folder: Path, stem: str, kind: str) -> Path:
    """The gzipped file if present, else the plain one."""
    gz = folder / f"{stem}.gz"
    for candidate in (gz, folder / stem):
        if candidate.is_file():
            return candidate
    raise _error(gz, f"is missing (expected an IDX {kind} file; {_HINT})")


def _read(path: Path) -> bytes:
    """The file's bytes, decompressed if it ends in .gz."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise _error(path, f"cannot be read (expected a complete gzip or IDX file: {e})") from e


def _read_idx(path: Path, magic: int, kind: str) -> np.ndarray:
    """Parse an unsigned-byte IDX file whose magic must equal `magic`."""
    data = _read(path)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise _error(path, f"is truncated (expected an IDX {kind} header of {header} bytes)")
    found = struct.unpack(">I", data[:4])[0]
    if found != magic:
        raise _error(path, f"has magic 0x{found:08x} (expected 0x{magic:08x}, an IDX {kind} file)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise _error(path, f"has {len(data)} bytes (expected {expected} for dims {dims})")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _load_split(folder: Path, prefix: str) -> ArrayDataset:
    images_path = _find(folder, f"{prefix}-images-idx3-ubyte", "image")
    labels_path = _find(folder, f"{prefix}-labels-idx1-ubyte", "label")
    images = _read_idx(images_path, IMAGE_MAGIC, "image")
    labels = _read_idx(labels_path, LABEL_MAGIC, "label")
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise _error(images_path, f"holds {images.shape[1:]} images (expected 28x28)")
    if len(labels) != len(images):
        raise _error(labels_path, f"has {len(labels)} labels but {images_path} has "
                                  f"{len(images)} images (expected equal counts)")
    if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise _error(labels_path, f"has label {labels.max()} (expected labels 0..9)")
    return ArrayDataset(images[:, None].copy(), labels.astype(np.int64))


def load_fashion_mnist(path: str | Path | None = None) -> DatasetSplits:
    """Fashion-MNIST from `path` (default: the Debian package's folder)."""
    folder = Path(path if path is not None else FASHION_MNIST_DIR)
    return DatasetSplits(
        name="fashion_mnist",
        train=_load_split(folder, "train"),
        test=_load_split(folder, "t10k"),
        class_names=FASHION_MNIST_CLASSES,
        mean=(0.2860,),
        std=(0.3530,),
    )
