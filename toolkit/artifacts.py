"""Trained NMoE models read back from a run dir (what `export/` packs into device bundles)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.checkpoint import JobState, JobStore, unpack
from toolkit.config import CLASSIC_GATES, EXTENDED_GATES, STAGE1_METHODS, Config
from toolkit.errors import DamagedFile
from toolkit.federated import Params
from toolkit.run_files import FLEET_FILE, read_config, read_dataset_info
from toolkit.torch_params import subset


def stage1_job(method: str) -> str:
    return f"stage1_{method}"


def stage2_job(method: str) -> str:
    return f"stage2_{method}"


def stage3_job(method: str, gate: str) -> str:
    return f"stage3_{method}_{gate}"


def shared_expert_job(method: str, gate: str) -> str:
    """The checkpoint of the shared expert a gate method of toolkit.gates sent its devices."""
    return f"shared_expert_{method}_{gate}"


SHARED_EXPERT_GATES = ("fedgate_vl", "localgate_vl", "fedgate_ood")  # their devices also hold a shared expert
OOD_GATES = ("fedgate_ood",)  # ... which an OOD score blends in (the others' gates route to it)


class ArtifactError(ValueError):
    """The run dir lacks a finished job needed for the requested method."""


@dataclass(frozen=True)
class DeviceModels:
    """What device `client` holds: the shared extractor, its gate (None for RanGate), its expert, and for
    SHARED_EXPERT_GATES the shared expert (its gate's last output)."""

    client: int
    extractor: Params
    gate: Params | None
    expert: Params
    shared_expert: Params | None = None


@dataclass(frozen=True)
class TrainedNMoE:
    """One NMoE method of a run: config, dataset facts and every device's models."""

    method: str
    config: Config
    dataset: dict[str, Any]
    devices: list[DeviceModels]


def parse_method(method: str) -> tuple[str, str]:
    """`nmoe_<stage1>_<gate>` -> (stage1, gate)."""
    parts = method.split("_", 2)
    gates = CLASSIC_GATES + SHARED_EXPERT_GATES
    if len(parts) != 3 or parts[0] != "nmoe" or parts[1] not in STAGE1_METHODS or parts[2] not in gates:
        others = ", ".join(g for g in EXTENDED_GATES if g not in SHARED_EXPERT_GATES)
        raise ArtifactError(f"{method!r} is not an NMoE method with device bundles (expected nmoe_<"
                            f"{'|'.join(STAGE1_METHODS)}>_<{'|'.join(gates)}>; bundles of {others} are not "
                            "supported yet, docs/gates.md)")
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
    if (run_dir / FLEET_FILE).exists():
        raise ArtifactError(f"{run_dir} is a federated run (nmoe federate): the private models live on the devices, "
                            "which rebuilt their own bundles at the commit (docs/federated.md); nothing to export here")
    for name in ("config.json", "dataset.json"):
        if not (run_dir / name).exists():
            raise ArtifactError(f"{run_dir} is not a run dir ({run_dir / name} is missing)")
    config, dataset = read_config(run_dir), read_dataset_info(run_dir)
    if stage1 not in config.stage1.methods or gate not in config.gate.methods:
        raise ArtifactError(f"{run_dir} did not train {method} (its config runs {', '.join(config.nmoe_methods())})")
    gate_job = None if gate == "rangate" else stage3_job(stage1, gate)
    shared_job = shared_expert_job(stage1, gate) if gate in SHARED_EXPERT_GATES else None
    arrays = {job: _finished(run_dir, job).arrays
              for job in (stage1_job(stage1), stage2_job(stage1), gate_job, shared_job) if job}

    def part(job: str, prefix: str, required: bool = True) -> Params:
        params = unpack(prefix, arrays[job])
        if not params and required:
            raise DamagedFile(f"{JobStore(run_dir / 'checkpoints', job).path}: no {prefix}/ arrays; expected the "
                              "checkpoint `nmoe train` writes for this job")
        return params

    extractor = subset(part(stage1_job(stage1), "shared"), "extractor.")
    shared_expert = None if shared_job is None else part(shared_job, "shared")
    devices = []
    for c in range(config.data.num_clients):  # a gate trained without sharing (localgate*) has no shared/ part
        own_gate = None if gate_job is None else {**part(gate_job, f"client{c}"), **part(gate_job, "shared", False)}
        devices.append(DeviceModels(c, extractor, own_gate, part(stage2_job(stage1), f"step{c}"), shared_expert))
    return TrainedNMoE(method, config, dataset, devices)
