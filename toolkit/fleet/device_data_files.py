"""Each simulated device's partition of a config as a device data file (device_agent.device_data).

The partition, the personalized test split and the normalization are exactly those of `nmoe
train` with the same config (`toolkit.federated_data.prepare`), so a fleet trained from these
files sees the data the in-process simulation sees.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from device_agent.bundle import InputSpec
from device_agent.device_data import DeviceData, Split, write_device_data
from toolkit.config import Config
from toolkit.federated_data import FederatedData, prepare, raw_images
from toolkit.training import TensorData


def device_data_path(folder: Path, client: int) -> Path:
    """Where client `client`'s file goes."""
    return folder / f"device-{client}.npz"


def write_fleet_data(cfg: Config, folder: Path, data: FederatedData | None = None,
                     with_global_test: bool = True) -> list[Path]:
    """One file per client of `cfg` in `folder` (created); the paths, in client order."""
    fd = data or prepare(cfg.data)
    s = fd.splits
    spec = InputSpec(list(s.input_shape), "uint8", 1 / 255, list(s.mean), list(s.std), "NCHW")
    global_test = _split(fd.global_test, spec) if with_global_test else None
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for c in range(fd.num_clients):
        path = device_data_path(folder, c)
        write_device_data(path, DeviceData(
            client=c, dataset=s.name, input_shape=s.input_shape, scale=1 / 255, mean=tuple(s.mean),
            std=tuple(s.std), class_names=tuple(s.class_names), train=_split(fd.train[c], spec),
            test=_split(fd.personal_test[c], spec), global_test=global_test))
        paths.append(path)
    return paths


def _split(t: TensorData, spec: InputSpec) -> Split:
    return Split(raw_images(t.x, spec), t.y.numpy().astype(np.int64))
