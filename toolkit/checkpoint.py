"""Resumable job state on disk: arrays in .npz (no pickle) plus JSON metadata, written atomically."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import DamagedFile, one_line
from toolkit.progress import progress_bar

_META_KEY = "__meta__"


@dataclass
class JobState:
    """A job's progress: `step` steps completed; `done` once its result is final."""

    step: int
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    done: bool = False


class JobStore:
    """One file per job under a run's checkpoint folder; each save replaces the last atomically."""

    def __init__(self, root: Path, job: str) -> None:
        self.path = Path(root) / f"{job}.npz"

    def load(self) -> JobState | None:
        """The last saved state, or None when the job never completed a step; DamagedFile when the
        file is truncated or not a checkpoint."""
        if not self.path.exists():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files if k != _META_KEY}  # reading checks each member's CRC
                meta = json.loads(bytes(z[_META_KEY]).decode())
            state = JobState(meta.pop("step"), arrays, meta.pop("user"), meta.pop("done"))
        except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile) as e:
            raise DamagedFile(f"{self.path}: damaged checkpoint ({type(e).__name__}: {one_line(e)}); expected an .npz "
                              "written by `nmoe train`: delete it to recompute that job") from None
        if not (isinstance(state.step, int) and isinstance(state.meta, dict) and isinstance(state.done, bool)):
            raise DamagedFile(f"{self.path}: damaged checkpoint (bad step, done or metadata); expected an .npz "
                              "written by `nmoe train`: delete it to recompute that job")
        return state

    def save(self, state: JobState) -> None:
        """Write state; a crash mid-write leaves the previous checkpoint intact."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        meta = json.dumps({"step": state.step, "done": state.done, "user": state.meta}).encode()
        tmp = self.path.with_suffix(".tmp.npz")
        with open(tmp, "wb") as f:  # (numpy's stub checks **arrays against savez's allow_pickle: ignored)
            np.savez(f, **state.arrays, **{_META_KEY: np.frombuffer(meta, dtype=np.uint8)})  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def pack(prefix: str, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Namespace a parameter dict inside a checkpoint's flat array dict."""
    return {f"{prefix}/{k}": v for k, v in params.items()}


def unpack(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of pack."""
    head = f"{prefix}/"
    return {k[len(head):]: v for k, v in arrays.items() if k.startswith(head)}


Step = Callable[[int, "dict[str, np.ndarray] | None"], tuple[dict[str, np.ndarray], dict[str, float]]]


def run_steps(store: JobStore, num_steps: int, step: Step, desc: str, unit: str,
              show_progress: bool = True) -> list[tuple[dict[str, np.ndarray], dict[str, float]]]:
    """Run step(i, previous_params) for i < num_steps, checkpointing after each; resumes where it stopped.

    Used for jobs made of independent or chained pieces: one expert per client, one epoch at a time.
    """
    done: list[tuple[dict[str, np.ndarray], dict[str, float]]] = []
    saved = store.load()
    if saved:
        done = [(unpack(f"step{i}", saved.arrays), saved.meta["metrics"][i]) for i in range(saved.step)]
    bar = progress_bar(total=num_steps, initial=len(done), desc=desc, unit=unit, enabled=show_progress)
    for i in range(len(done), num_steps):
        done.append(step(i, done[-1][0] if done else None))
        arrays = {k: v for j, (p, _) in enumerate(done) for k, v in pack(f"step{j}", p).items()}
        store.save(JobState(i + 1, arrays, {"metrics": [m for _, m in done]}, i + 1 == num_steps))
        bar.update(1)
    bar.close()
    return done
