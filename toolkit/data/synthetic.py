"""A small, learnable synthetic image dataset: noisy, shifted copies of per-class blob templates."""

from __future__ import annotations

import numpy as np

from toolkit.data.dataset import ArrayDataset, DatasetSplits

BLOBS_PER_CLASS = 4
MAX_SHIFT = 1.5  # pixels, uniform in each direction
NOISE_STD = 25.0  # on the 0..255 scale


def _blob_params(rng: np.random.Generator, num_classes: int, channels: int,
                 size: int) -> dict[str, np.ndarray]:
    """Centres, widths and per-channel amplitudes of each class's Gaussian blobs."""
    shape = (num_classes, BLOBS_PER_CLASS)
    return {
        "cy": rng.uniform(0.15, 0.85, shape) * size,
        "cx": rng.uniform(0.15, 0.85, shape) * size,
        "sigma": rng.uniform(0.08, 0.2, shape) * size,
        "amp": rng.uniform(60.0, 200.0, (*shape, channels)),
    }


def _render(params: dict[str, np.ndarray], labels: np.ndarray, shifts: np.ndarray,
            size: int) -> np.ndarray:
    """Float images [N, C, size, size]: each label's blobs moved by its (dy, dx) shift."""
    grid = np.arange(size, dtype=np.float64)
    cy = params["cy"][labels] + shifts[:, :1]  # [N, B]
    cx = params["cx"][labels] + shifts[:, 1:]
    sigma = params["sigma"][labels]
    gy = np.exp(-((grid - cy[..., None]) ** 2) / (2 * sigma[..., None] ** 2))  # [N, B, H]
    gx = np.exp(-((grid - cx[..., None]) ** 2) / (2 * sigma[..., None] ** 2))  # [N, B, W]
    images: np.ndarray = np.einsum("nbc,nbh,nbw->nchw", params["amp"][labels], gy, gx)
    return images


def _make_split(rng: np.random.Generator, params: dict[str, np.ndarray], n: int,
                num_classes: int, size: int) -> ArrayDataset:
    """n samples with balanced classes (counts differ by at most one), in random order."""
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    shifts = rng.uniform(-MAX_SHIFT, MAX_SHIFT, (n, 2))
    images = _render(params, labels, shifts, size)
    images += rng.normal(0.0, NOISE_STD, images.shape)
    return ArrayDataset(np.clip(np.rint(images), 0, 255).astype(np.uint8), labels)


def _check_args(num_train: int, num_test: int, num_classes: int, image_size: int,
                channels: int) -> None:
    if num_classes < 2:
        raise ValueError(f"synthetic: num_classes must be >= 2, got {num_classes}")
    if min(num_train, num_test) < num_classes:
        raise ValueError(f"synthetic: num_train and num_test must be >= num_classes "
                         f"({num_classes}), got {num_train} and {num_test}")
    if image_size < 4 or channels < 1:
        raise ValueError(f"synthetic: need image_size >= 4 and channels >= 1, "
                         f"got {image_size} and {channels}")


def load_synthetic(num_train: int = 2000, num_test: int = 500, num_classes: int = 10,
                   image_size: int = 16, channels: int = 1, seed: int = 0) -> DatasetSplits:
    """Deterministic (by seed) balanced synthetic images, uint8 [N, channels, size, size]."""
    _check_args(num_train, num_test, num_classes, image_size, channels)
    rng = np.random.default_rng(seed)
    params = _blob_params(rng, num_classes, channels, image_size)
    train = _make_split(rng, params, num_train, num_classes, image_size)
    test = _make_split(rng, params, num_test, num_classes, image_size)
    pixels = train.x.astype(np.float64) / 255.0
    return DatasetSplits(
        name="synthetic",
        train=train,
        test=test,
        class_names=tuple(f"class{k}" for k in range(num_classes)),
        mean=tuple(float(m) for m in pixels.mean(axis=(0, 2, 3))),
        std=tuple(float(s) for s in pixels.std(axis=(0, 2, 3))),
    )
