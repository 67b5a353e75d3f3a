"""`nmoe federate --stage1-from RUN_DIR`: Stage 1 taken from a finished run of the same Stage 1 config.

Stage 1 trains convolutions, which a device with only the [agent] extra (numpy) cannot do. A fleet
of such devices can still run Stages 2 and 3 when Stage 1 comes from elsewhere: an `nmoe train` run
(or an earlier `nmoe federate`) whose config agrees on everything Stage 1 depends on. Its finished
Stage 1 checkpoints are copied into the new run dir before the recipe starts, so the recipe finds
Stage 1 complete and never asks a device for it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from toolkit.artifacts import stage1_job
from toolkit.checkpoint import JobStore
from toolkit.config import Config
from toolkit.run_files import read_config
from toolkit.rundir import _diff

STAGE1_SECTIONS = ("seed", "data", "model", "federated", "stage1")  # what a Stage 1 job's result depends on
FEDAVG_JOB = stage1_job("fedce")  # the `fedavg` baseline is Stage 1 FedCE's curve


class Stage1SourceError(ValueError):
    """The run dir given to --stage1-from cannot supply this config's Stage 1."""


def _stage1_part(cfg: Config) -> dict[str, Any]:
    """The config keys Stage 1 depends on (which Stage 1 methods a run selects is not one of them)."""
    d = cfg.to_dict()
    part = {k: d[k] for k in STAGE1_SECTIONS}
    part["stage1"] = {k: v for k, v in part["stage1"].items() if k != "methods"}
    return part


def _finished(source: Path, job: str) -> bool:
    state = JobStore(source / "checkpoints", job).load()
    return state is not None and state.done


def stage1_jobs(cfg: Config, source: Path) -> list[str]:
    """The Stage 1 jobs to copy from `source`: one per Stage 1 method of `cfg`, plus FedCE's for the
    `fedavg` baseline when the source finished it. Stage1SourceError when the source cannot supply them."""
    if not (source / "config.json").is_file():
        raise Stage1SourceError(f"--stage1-from {source}: not a run dir ({source / 'config.json'} is missing)")
    changes = _diff(_stage1_part(read_config(source)), _stage1_part(cfg))
    if changes:
        raise Stage1SourceError(f"--stage1-from {source}: its Stage 1 was trained with another config "
                                f"({'; '.join(changes[:5])})")
    jobs = [stage1_job(m) for m in cfg.stage1.methods]
    unfinished = [job for job in jobs if not _finished(source, job)]
    if unfinished:
        raise Stage1SourceError(f"--stage1-from {source}: Stage 1 job(s) {', '.join(unfinished)} did not finish "
                                "there (run `nmoe train` on it first)")
    if "fedavg" in cfg.baselines.methods and FEDAVG_JOB not in jobs and _finished(source, FEDAVG_JOB):
        jobs.append(FEDAVG_JOB)
    return jobs


def take_stage1(cfg: Config, source: Path, checkpoints: Path) -> list[str]:
    """Copy the finished Stage 1 checkpoints of `source` into `checkpoints` (atomically; a copy already
    there and finished is kept); the jobs taken. Stage1SourceError when the source cannot supply them."""
    jobs = stage1_jobs(cfg, source)
    checkpoints.mkdir(parents=True, exist_ok=True)
    for job in jobs:
        target = JobStore(checkpoints, job).path
        if _finished(checkpoints.parent, job):
            continue
        tmp = target.with_suffix(".tmp.npz")
        shutil.copyfile(JobStore(source / "checkpoints", job).path, tmp)
        os.replace(tmp, target)
    return jobs
