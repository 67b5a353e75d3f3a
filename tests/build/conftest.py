"""Fixtures of the device-rebuild tests: the tiny run's trained models and data, and copies of its export."""

import shutil
from pathlib import Path

import pytest

from export.bundle_writer import DeviceModules, device_modules
from toolkit.artifacts import TrainedNMoE, load_nmoe
from toolkit.federated_data import FederatedData, prepare

METHOD = "nmoe_fedce_fedgate"  # what the shared session export (onnx_tflite_bundles) holds


@pytest.fixture(scope="session")
def trained(run_dir: Path) -> TrainedNMoE:
    return load_nmoe(run_dir, METHOD)


@pytest.fixture(scope="session")
def modules(trained: TrainedNMoE) -> list[DeviceModules]:
    """Every device's torch models (the reference of the exported files)."""
    return device_modules(trained)


@pytest.fixture(scope="session")
def data(trained: TrainedNMoE) -> FederatedData:
    return prepare(trained.config.data)


@pytest.fixture
def bundles_copy(onnx_tflite_bundles: Path, tmp_path: Path) -> Path:
    """A writable copy of the shared export's device-*/ folders (ONNX and LiteRT, fp32 and int8)."""
    dest = tmp_path / "bundles"
    for folder in sorted(onnx_tflite_bundles.glob("device-*")):
        shutil.copytree(folder, dest / folder.name)
    return dest
