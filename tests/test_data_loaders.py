"""Dataset loaders: real Fashion-MNIST, hand-written IDX and CIFAR-10 files, synthetic data."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from toolkit.data import (
    FASHION_MNIST_DIR,
    ArrayDataset,
    DataError,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    load_synthetic,
)

# --- Fashion-MNIST -------------------------------------------------------------------------------


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(),
                    reason=f"{FASHION_MNIST_DIR} absent (Debian package dataset-fashion-mnist)")
def test_real_fashion_mnist_loads() -> None:
    splits = load_dataset("fashion_mnist")
    assert splits.name == "fashion_mnist" and splits.num_classes == 10
    assert splits.input_shape == (1, 28, 28)
    assert splits.train.x.shape == (60000, 1, 28, 28) and splits.train.x.dtype == np.uint8
    assert splits.test.x.shape == (10000, 1, 28, 28) and splits.test.y.dtype == np.int64
    assert np.bincount(splits.train.y).tolist() == [6000] * 10
    assert np.bincount(splits.test.y).tolist() == [1000] * 10
    assert splits.train.x.mean() / 255 == pytest.approx(splits.mean[0], abs=1e-3)


def _idx(magic: int, array: np.ndarray) -> bytes:
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def _write_fmnist(folder: Path, gz: bool, n: int = 6) -> dict[str, np.ndarray]:
    """Small IDX files for both splits; returns the arrays written, by file stem."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for stem, magic, array in ((f"{prefix}-images-idx3-ubyte", 0x803, images),
                                   (f"{prefix}-labels-idx1-ubyte", 0x801, labels)):
            data = _idx(magic, array)
            if gz:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / stem).write_bytes(data)
            arrays[stem] = array
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_written_idx_files_load(tmp_path: Path, gz: bool) -> None:
    arrays = _write_fmnist(tmp_path, gz)
    splits = load_fashion_mnist(tmp_path)
    np.testing.assert_array_equal(splits.train.x[:, 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(splits.test.y, arrays["t10k-labels-idx1-ubyte"])
    assert splits.train.x.shape == (6, 1, 28, 28) and splits.train.y.dtype == np.int64


def _wrong_magic(folder: Path) -> Path:
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(_idx(0x801, np.zeros((6, 28, 28))))
    return path


def _truncated_file(folder: Path) -> Path:
    path = folder / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    return path


def _truncated_header(folder: Path) -> Path:
    path = folder / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:6])
    return path


def _truncated_gzip(folder: Path) -> Path:
    plain = folder / "train-labels-idx1-ubyte"
    path = folder / "train-labels-idx1-ubyte.gz"
    data = gzip.compress(plain.read_bytes())
    path.write_bytes(data[: len(data) // 2])
    return path


def _missing_file(folder: Path) -> Path:
    (folder / "t10k-labels-idx1-ubyte").unlink()
    return folder / "t10k-labels-idx1-ubyte.gz"


def _label_out_of_range(folder: Path) -> Path:
    path = folder / "train-labels-idx1-ubyte"
    path.write_bytes(_idx(0x801, np.array([0, 1, 2, 10, 3, 4])))
    return path


def _mismatched_counts(folder: Path) -> Path:
    path = folder / "t10k-labels-idx1-ubyte"
    path.write_bytes(_idx(0x801, np.arange(5)))
    return path


@pytest.mark.parametrize("corrupt", [_wrong_magic, _truncated_file, _truncated_header,
                                     _truncated_gzip, _missing_file, _label_out_of_range,
                                     _mismatched_counts])
def test_bad_idx_files_raise_data_error_naming_path(
        tmp_path: Path, corrupt: Callable[[Path], Path]) -> None:
    _write_fmnist(tmp_path, gz=False)
    bad = corrupt(tmp_path)
    with pytest.raises(DataError, match=re.escape(str(bad))):
        load_fashion_mnist(tmp_path)


def test_missing_folder_mentions_debian_package(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nowhere")


# --- CIFAR-10 ------------------------------------------------------------------------------------


class _Py2Pickler(pickle._Pickler):
    """Writes pickles as Python 2 did: str/bytes as BINSTRING, numpy.core module paths."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + struct.pack("<B", len(data)) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj: object, name: str | None = None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def _py2_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


CLASSES = [b"airplane", b"automobile", b"bird", b"cat", b"deer",
           b"dog", b"frog", b"horse", b"ship", b"truck"]


def _write_cifar(root: Path, rows: int = 3) -> dict[str, dict[bytes, object]]:
    """A 'cifar-10-batches-py' folder in the original format; returns the batches by file name."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    batches: dict[str, dict[bytes, object]] = {}
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        batches[name] = {
            b"batch_label": f"batch {i}".encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, rows)],
            b"data": rng.integers(0, 256, (rows, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}_{r}.png".encode() for r in range(rows)],
        }
        (folder / name).write_bytes(_py2_pickle(batches[name]))
    meta = {b"num_cases_per_batch": rows, b"label_names": CLASSES, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(_py2_pickle(meta))
    return batches


def test_cifar_loads_with_rgb_planes(tmp_path: Path) -> None:
    batches = _write_cifar(tmp_path)
    data = batches["data_batch_2"][b"data"]
    r, c = 5, 17
    data[1, [r * 32 + c, 1024 + r * 32 + c, 2048 + r * 32 + c]] = [11, 22, 33]
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(
        _py2_pickle(batches["data_batch_2"]))
    for path in (tmp_path, tmp_path / "cifar-10-batches-py"):
        splits = load_cifar10(path)
        assert splits.train.x.shape == (15, 3, 32, 32) and splits.train.x.dtype == np.uint8
        assert splits.test.x.shape == (3, 3, 32, 32) and splits.test.y.dtype == np.int64
        assert splits.train.x[3 + 1, :, r, c].tolist() == [11, 22, 33]
        assert splits.train.y[3:6].tolist() == batches["data_batch_2"][b"labels"]
        assert splits.class_names[0] == "airplane" and splits.num_classes == 10
        assert splits.input_shape == (3, 32, 32)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_cifar_forbidden_global_is_refused_and_not_run(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    bad.write_bytes(_py2_pickle({b"data": _Evil(marker)}))
    with pytest.raises(DataError, match=f"refusing to unpickle .*system from {re.escape(str(bad))}"):
        load_cifar10(tmp_path)
    assert not marker.exists()
    pickle.loads(bad.read_bytes(), encoding="bytes")  # the payload is live: a plain load runs it
    assert marker.exists()


def _missing_batch(folder: Path, batches: dict[str, dict[bytes, object]]) -> Path:
    (folder / "data_batch_3").unlink()
    return folder / "data_batch_3"


def _bad_shape(folder: Path, batches: dict[str, dict[bytes, object]]) -> Path:
    batches["test_batch"][b"data"] = np.zeros((3, 3000), np.uint8)
    (folder / "test_batch").write_bytes(_py2_pickle(batches["test_batch"]))
    return folder / "test_batch"


def _bad_dtype(folder: Path, batches: dict[str, dict[bytes, object]]) -> Path:
    batches["data_batch_1"][b"data"] = np.zeros((3, 3072), np.float32)
    (folder / "data_batch_1").write_bytes(_py2_pickle(batches["data_batch_1"]))
    return folder / "data_batch_1"


def _bad_label(folder: Path, batches: dict[str, dict[bytes, object]]) -> Path:
    batches["data_batch_4"][b"labels"] = [0, 10, 1]
    (folder / "data_batch_4").write_bytes(_py2_pickle(batches["data_batch_4"]))
    return folder / "data_batch_4"


def _missing_key(folder: Path, batches: dict[str, dict[bytes, object]]) -> Path:
    del batches["data_batch_5"][b"labels"]
    (folder / "data_batch_5").write_bytes(_py2_pickle(batches["data_batch_5"]))
    return folder / "data_batch_5"


def _truncated_pickle(folder: Path, batches: dict[str, dict[bytes, object]]) -> Path:
    path = folder / "data_batch_2"
    path.write_bytes(path.read_bytes()[:100])
    return path


def _bad_meta(folder: Path, batches: dict[str, dict[bytes, object]]) -> Path:
    (folder / "batches.meta").write_bytes(_py2_pickle({b"label_names": CLASSES[:9]}))
    return folder / "batches.meta"


@pytest.mark.parametrize("corrupt", [_missing_batch, _bad_shape, _bad_dtype, _bad_label,
                                     _missing_key, _truncated_pickle, _bad_meta])
def test_bad_cifar_raises_data_error_naming_path(
        tmp_path: Path, corrupt: Callable[[Path, dict[str, dict[bytes, object]]], Path]) -> None:
    batches = _write_cifar(tmp_path)
    bad = corrupt(tmp_path / "cifar-10-batches-py", batches)
    with pytest.raises(DataError, match=re.escape(str(bad))):
        load_cifar10(tmp_path)


# --- synthetic and dispatch ----------------------------------------------------------------------


def test_synthetic_is_deterministic_and_balanced() -> None:
    a, b = load_synthetic(seed=3), load_synthetic(seed=3)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.test.y, b.test.y)
    assert not np.array_equal(a.train.x, load_synthetic(seed=4).train.x)
    assert np.bincount(a.train.y).tolist() == [200] * 10
    assert np.bincount(a.test.y).tolist() == [50] * 10
    assert a.train.x.dtype == np.uint8 and a.train.y.dtype == np.int64
    assert a.mean[0] == pytest.approx(a.train.x.mean() / 255)
    assert a.std[0] == pytest.approx((a.train.x / 255).std())
    assert a.class_names[3] == "class3"


def test_synthetic_shapes_follow_options() -> None:
    s = load_synthetic(num_train=30, num_test=7, num_classes=3, image_size=8, channels=3)
    assert s.input_shape == (3, 8, 8) and len(s.train) == 30 and len(s.test) == 7
    assert len(s.mean) == len(s.std) == 3 and s.num_classes == 3


def test_synthetic_nearest_template_accuracy() -> None:
    s = load_synthetic()
    x = s.train.x.reshape(len(s.train), -1).astype(np.float64)
    templates = np.stack([x[s.train.y == k].mean(axis=0) for k in range(s.num_classes)])
    xt = s.test.x.reshape(len(s.test), -1).astype(np.float64)
    pred = ((xt[:, None] - templates[None]) ** 2).sum(axis=-1).argmin(axis=1)
    assert (pred == s.test.y).mean() > 0.9


def test_load_dataset_dispatch_and_errors() -> None:
    assert load_dataset("synthetic", num_train=20, num_test=10).name == "synthetic"
    with pytest.raises(DataError, match="fashion_mnist, cifar10, synthetic"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="data.path"):
        load_dataset("cifar10")


def test_array_dataset_subset_and_validation() -> None:
    ds = ArrayDataset(np.arange(24, dtype=np.uint8).reshape(6, 1, 2, 2), np.arange(6))
    sub = ds.subset(np.array([1, 4]))
    assert len(sub) == 2 and sub.y.tolist() == [1, 4] and sub.x[1, 0, 0, 0] == 16
    with pytest.raises(ValueError, match="ArrayDataset"):
        ArrayDataset(np.zeros((3, 4, 4), np.uint8), np.zeros(3, np.int64))


def test_cifar_files_run_through_training(tmp_path: Path) -> None:
    """The standard CIFAR-10 files drive a whole (small) `nmoe train` run: 3-channel 32x32 end to end."""
    import json

    from toolkit.cli import main

    _write_cifar(tmp_path / "data", rows=60)
    out = tmp_path / "run"
    tiny = Path(__file__).resolve().parent.parent / "configs" / "tiny.toml"
    overrides = ["data.dataset=cifar10", f"data.path={tmp_path / 'data'}", "data.personal_test_size=20",
                 "data.min_client_size=5", 'stage1.methods=["fedce"]', 'gate.methods=["fedgate"]',
                 'baselines.methods=["fedavg"]', "federated.rounds=1", "gate.rounds=1"]
    assert main(["train", str(tiny), "--out", str(out), "--quiet", *[a for o in overrides for a in ("--set", o)]]) == 0
    assert json.loads((out / "dataset.json").read_text())["input_shape"] == [3, 32, 32]
    assert set(json.loads((out / "metrics.json").read_text())["methods"]) == {"fedavg", "nmoe_fedce_fedgate"}
