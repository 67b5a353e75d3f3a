"""The bundle writer: model files, samples.npz and manifest.json, swapped in only once verified.

One writer for both producers of bundles: `nmoe export` (export/bundle_writer.py, from torch) and
a device rebuilding its own bundle after federated training (device_agent.rebuild). Files are
written into a scratch folder next to the destination, hashed into the manifest, verified with
the agent's own loader (and an optional check, e.g. running every model), synced to disk, and
only then swapped in place of the previous bundle, which stays untouched until that point.
numpy only.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.bundle import (
    MANIFEST,
    Bundle,
    BundleError,
    Manifest,
    ModelEntry,
    SamplesRef,
    TensorSpec,
    file_sha256,
    load_bundle,
)

SAMPLES = "samples.npz"
OOD = "ood.npz"  # the OOD score of a shared expert in mode "fallback"


@dataclass(frozen=True)
class ModelFile:
    """A model file written into the scratch folder, with its I/O as the file declares it."""

    role: str
    format: str
    precision: str
    path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def entry(self) -> ModelEntry:
        """Its manifest entry: file name, sha256 and size of the bytes on disk."""
        return ModelEntry(role=self.role, format=self.format, precision=self.precision, file=self.path.name,
                          sha256=file_sha256(self.path), bytes=self.path.stat().st_size, inputs=self.inputs,
                          outputs=self.outputs)


WriteModels = Callable[[Path], Sequence[ModelFile]]  # writes the model files into the folder given
CheckBundle = Callable[[Bundle], None]  # raises when a loaded scratch bundle must not replace the old one


def package_versions(packages: Iterable[str]) -> dict[str, str | None]:
    """Installed version of each distribution (None when absent), for provenance."""
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {p: version(p) for p in packages}


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (provenance `created`)."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def scratch_dir(dest: Path) -> Path:
    """Where a new bundle for `dest` is written before it is verified."""
    return dest.with_name(f".{dest.name}.partial")


def previous_dir(dest: Path) -> Path:
    """Where the previous bundle waits during the swap."""
    return dest.with_name(f".{dest.name}.old")


def restore_interrupted(dest: Path) -> None:
    """Undo a swap cut short (process killed between its two renames): put the previous bundle back."""
    old = previous_dir(dest)
    if not dest.exists() and (old / MANIFEST).is_file():
        old.rename(dest)


def write_bundle(dest: Path, manifest: Manifest, write_models: WriteModels, samples: Mapping[str, np.ndarray],
                 check: CheckBundle | None = None, ood: Mapping[str, np.ndarray] | None = None) -> Bundle:
    """Write a bundle to `dest`, replacing the one there only after the new one verifies.

    `manifest` gives every field but `models` and `samples` (and its shared expert's `ood`, written from
    `ood` when given), which come from the files written.
    On any failure (including BundleError from verification or `check`) the scratch folder is
    removed and `dest` is as it was. A `dest` that exists but holds no manifest is never replaced.
    """
    restore_interrupted(dest)
    if dest.exists() and not (dest / MANIFEST).is_file():
        raise BundleError(f"{dest} exists and is not a bundle (no {MANIFEST}); refusing to replace it")
    scratch = scratch_dir(dest)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        models = list(write_models(scratch))
        outside = [str(m.path) for m in models if m.path.parent != scratch]
        if outside:
            raise BundleError(f"{dest}: model files written outside the bundle folder: {', '.join(outside)}")
        full = dataclasses.replace(manifest, models=[m.entry() for m in models], samples=_save(scratch / SAMPLES, samples))
        if ood is not None and manifest.shared_expert is not None:
            full = dataclasses.replace(full, shared_expert=dataclasses.replace(
                manifest.shared_expert, ood=_save(scratch / OOD, ood)))
        (scratch / MANIFEST).write_text(json.dumps(full.to_dict(), indent=2) + "\n")
        written = load_bundle(scratch)
        if check is not None:
            check(written)
        _sync(scratch)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    old = previous_dir(dest)
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    scratch.rename(dest)
    _sync_dir(dest.parent)
    shutil.rmtree(old, ignore_errors=True)
    return Bundle(dest, written.manifest)


def _save(path: Path, tensors: Mapping[str, np.ndarray]) -> SamplesRef:
    """An .npz of `tensors` and its reference for the manifest."""
    arrays: dict[str, Any] = dict(tensors)  # Any: numpy's stub would match a key to savez's own options
    with path.open("wb") as f:
        np.savez(f, **arrays)
    return SamplesRef(path.name, file_sha256(path), path.stat().st_size)


def _sync(folder: Path) -> None:
    """Flush the folder's files and entries to disk (a device may lose power right after the swap)."""
    for path in folder.iterdir():
        with path.open("rb") as f:
            os.fsync(f.fileno())
    _sync_dir(folder)


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
