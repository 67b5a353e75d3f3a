"""The run dir contract: resolved config, checkpoints, metrics.json, report and plots."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from toolkit.config import Config, from_dict
from toolkit.errors import RunDirConflict
from toolkit.federated.executor import Executor
from toolkit.federated_data import dataset_info
from toolkit.pipeline import Pipeline
from toolkit.report import write_report
from toolkit.run_files import read_json
from toolkit.simulation import Place, in_process

log = logging.getLogger("nmoe")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a crash never leaves half a file), streamed: a 1000-client metrics.json
    (N x N routing matrices) is never one string in memory."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(a.keys() | b.keys())
                for d in _diff(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)]
    return [] if a == b else [f"{prefix}: {a!r} -> {b!r}"]


def claim(out: Path, cfg: Config) -> bool:
    """Create or reopen a run dir for cfg; True when resuming. Refuses a dir holding progress of another config
    (a dir with no checkpoint yet, e.g. after a bad data path, is simply taken over)."""
    path = out / "config.json"
    started = any((out / "checkpoints").glob("*.npz"))
    if path.exists() and started:
        # keys added since then: their defaults
        old = from_dict(read_json(path, "the resolved config of the run this dir holds")).to_dict()
        changes = _diff(old, cfg.to_dict())
        if changes:
            raise RunDirConflict(f"{out} holds a run of a different config ({'; '.join(changes[:5])}). "
                                 "Use another --out, or delete the folder to start over.")
        return True
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, cfg.to_dict())
    return False


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "processor": cpu, "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__}


@contextmanager
def run_log(out: Path) -> Iterator[None]:
    """Log the `nmoe` logger to OUT/run.log (appending: a resumed run continues its log)."""
    handler = logging.FileHandler(out / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("nmoe").addHandler(handler)
    logging.getLogger("nmoe").setLevel(logging.INFO)
    try:
        yield
    finally:
        logging.getLogger("nmoe").removeHandler(handler)
        handler.close()


def finish(out: Path, cfg: Config, methods: dict[str, Any], elapsed_s: float, resuming: bool,
           **extra: Any) -> dict[str, Any]:
    """Write OUT/metrics.json (the methods' metrics and what they were measured on) and the report."""
    metrics = {
        "dataset": cfg.data.dataset, "config": cfg.to_dict(), "config_hash": cfg.hash(),
        "elapsed_seconds": round(elapsed_s, 1), "resumed": resuming, "machine": machine(), "methods": methods,
        **extra,
    }
    write_json(out / "metrics.json", metrics)
    write_report(metrics, out)
    log.info("done: %s", out / "metrics.json")
    return metrics


def train(cfg: Config, out: Path, show_progress: bool = True, executor: Executor | None = None,
          place: Place = in_process) -> dict[str, Any]:
    """Run (or resume) every method of cfg into `out`; returns the metrics written to metrics.json.
    `executor` and `place` (e.g. a RayExecutor and its `place`) say where the clients' updates run."""
    resuming = claim(out, cfg)
    with run_log(out):
        log.info("%s run in %s (config %s)", "resuming" if resuming else "starting", out, cfg.hash()[:12])
        start = time.perf_counter()
        pipeline = Pipeline(cfg, out / "checkpoints", show_progress, executor=executor, place=place)
        write_json(out / "dataset.json", dataset_info(pipeline.fd.splits))
        methods = pipeline.run()
        return finish(out, cfg, methods, time.perf_counter() - start, resuming, compute=pipeline.compute())
