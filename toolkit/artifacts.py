"""Trained NMoE models read back from a run dir (what `export/` packs into device bundles)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from toolkit.checkpoint import JobState, JobStore, unpack
from toolkit.config import CLASSIC_GATES, STAGE1_METHODS, Config, from_dict
from toolkit.federated import Params
from toolkit.torch_params import subset


def stage1_job(method: str) -> str:
    return f"stage1_{method}"


def stage2_job(method: str) -> str:
    return f"stage2_{method}"


def stage3_job(method: str, gate: str) -> str:
    return f"stage3_{method}_{gate}"


class ArtifactError(ValueError):
    """The run dir lacks a finished job needed for the requested method."""


@dataclass(frozen=True)
class DeviceModels:
    """What device `client` holds: the shared extractor, its gate (None for RanGate), its expert."""

    client: int
    extractor: Params
    gate: Params | None
    expert: Params


@dataclass(frozen=True)
class TrainedNMoE:
    """One NMoE method of a run: config, dataset facts and every device's models."""

    method: str
    config: Config
    dataset: dict
    devices: list[DeviceModels]


def parse_method(method: str) -> tuple[str, str]:
    """`nmoe_<stage1>_<gate>` -> (stage1, gate)."""
    parts = method.split("_")
    if len(parts) != 3 or parts[0] != "nmoe" or parts[1] not in STAGE1_METHODS or parts[2] not in CLASSIC_GATES:
        raise ArtifactError(f"{method!r} is not an NMoE method (expected nmoe_<{'|'.join(STAGE1_METHODS)}>_"
                            f"<{'|'.join(CLASSIC_GATES)}>; bundles of toolkit.gates' methods are not supported yet)")
    return parts[1], parts[2]


def _finished(run_dir: Path, job: str) -> JobState:
    state = JobStore(run_dir / "checkpoints", job).load()
    if state is None or not state.done:
        raise ArtifactError(f"{run_dir}: job {job} has not finished; run `nmoe train` on this run dir first")
    return state


def load_nmoe(run_dir: Path, method: str) -> TrainedNMoE:
    """Every device's models for `method` from a finished run dir."""
    run_dir = Path(run_dir)
    stage1, gate = parse_method(method)
    try:
        config = from_dict(json.loads((run_dir / "config.json").read_text()))
        dataset = json.loads((run_dir / "dataset.json").read_text())
    except FileNotFoundError as e:
        raise ArtifactError(f"{run_dir} is not a run dir ({e.filename} is missing)") from None
    if stage1 not in config.stage1.methods or gate not in config.gate.methods:
        raise ArtifactError(f"{run_dir} did not train {method} (its config runs {', '.join(config.nmoe_methods())})")
    extractor = subset(unpack("shared", _finished(run_dir, stage1_job(stage1)).arrays), "extractor.")
    experts = _finished(run_dir, stage2_job(stage1)).arrays
    gates = None if gate == "rangate" else _finished(run_dir, stage3_job(stage1, gate)).arrays
    devices = []
    for c in range(config.data.num_clients):
        own_gate = None if gates is None else {**unpack(f"client{c}", gates), **unpack("shared", gates)}
        devices.append(DeviceModels(c, extractor, own_gate, unpack(f"step{c}", experts)))
    return TrainedNMoE(method, config, dataset, devices)
