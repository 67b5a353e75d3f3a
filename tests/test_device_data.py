"""Device data files: written from a config's partition, read back torch-free, checked strictly."""

from pathlib import Path

import numpy as np
import pytest
import torch

from device_agent.device_data import DeviceDataError, load_device_data
from toolkit.config import load
from toolkit.data import ArrayDataset
from toolkit.federated_data import normalize, prepare
from toolkit.fleet.device_data_files import write_fleet_data

ROOT = Path(__file__).resolve().parent.parent


def test_files_hold_exactly_the_simulation_partition(tmp_path: Path) -> None:
    cfg = load(ROOT / "configs" / "tiny.toml", ["data.num_clients=3"])
    fd = prepare(cfg.data)
    paths = write_fleet_data(cfg, tmp_path, fd)
    assert [p.name for p in paths] == ["device-0.npz", "device-1.npz", "device-2.npz"]
    for c, path in enumerate(paths):
        d = load_device_data(path)
        assert d.client == c and d.input_shape == fd.splits.input_shape and d.num_classes == fd.splits.num_classes
        for split, ref in ((d.train, fd.train[c]), (d.test, fd.personal_test[c]), (d.global_test, fd.global_test)):
            assert split is not None
            again = normalize(ArrayDataset(split.x, split.y), fd.splits.mean, fd.splits.std)
            assert torch.equal(again.x, ref.x) and torch.equal(again.y, ref.y)
        np.testing.assert_allclose(d.normalized(d.train.x), fd.train[c].x.numpy(), atol=1e-6)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "no_meta", "bad_labels", "wrong_dtype"])
def test_damaged_files_are_one_clear_error(tmp_path: Path, damage: str) -> None:
    cfg = load(ROOT / "configs" / "tiny.toml", ["data.num_clients=2"])
    path = write_fleet_data(cfg, tmp_path, with_global_test=False)[0]
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a zip at all")
    else:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        if damage == "no_meta":
            del arrays["meta"]
        elif damage == "bad_labels":
            arrays["train_y"] = arrays["train_y"] + 100
        else:
            arrays["train_x"] = arrays["train_x"].astype(np.float32)
        np.savez(path, **arrays)
    with pytest.raises(DeviceDataError, match=str(path.name)):
        load_device_data(path)
