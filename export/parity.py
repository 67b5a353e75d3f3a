"""Parity of exported bundles with the torch fp32 models: diffs, agreement, NMoE accuracy, latency.

Every exported model is run through the device agent's own runtime (`device_agent.runtime`) on
the client's held-out personalized test samples and compared with the torch module it came from;
the whole fleet's NMoE accuracy is measured with the agent's `LocalNMoE` against the torch NMoE
(toolkit.evaluate) and the accuracy the run itself measured (metrics.json). A shared expert (schema 3
bundles) is one more expert of every device's torch NMoE, as in training. For RanGate devices the torch reference reuses the device's random draws, so
the comparison measures the export, not the dice.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from device_agent.bundle import Bundle, ModelEntry
from device_agent.nmoe_local import LocalNMoE, top_k_route
from device_agent.ood_score import OODScore
from device_agent.runtime import open_runtime
from export.bundle_writer import DeviceModules
from toolkit.evaluate import ExpertOutputs, Router, nmoe_predict, predict
from toolkit.federated_data import FederatedData, raw_images
from toolkit.progress import progress_bar
from toolkit.rundir import machine, write_json

PARITY_SAMPLES = 256
LATENCY_WARMUP = 20
LATENCY_RUNS = 200
THREADS = 1
RUNTIME_PACKAGES = ("onnxruntime", "executorch", "ai-edge-litert")


@dataclass(frozen=True)
class ModelParity:
    """One model file against its torch module."""

    device: str
    role: str
    format: str
    precision: str
    file: str
    bytes: int
    samples: int
    max_abs_diff: float
    reference_max_abs: float  # max |torch output|: the scale the diff is judged against
    agreement: float  # extractor: mean cosine; gate: top-k set agreement; expert: argmax agreement
    agreement_kind: str  # "cosine" | "top-<k> set" | "argmax"
    latency_us_median: float
    latency_us_p99: float


@dataclass(frozen=True)
class NMoEParity:
    """One device's NMoE (LocalNMoE over the fleet's bundles) against the torch fp32 NMoE."""

    device: str
    format: str
    precision: str
    samples: int
    model_bytes: int  # this device's files of this format and precision
    torch_accuracy: float  # percent
    accuracy: float  # percent
    drop: float  # points below torch
    agreement: float  # fraction of predictions equal to torch's
    latency_us_median: float  # one image, every expert in-process
    latency_us_p99: float
    run_accuracy: float | None = None  # percent: the device's personalized accuracy in the run's metrics.json


@dataclass(frozen=True)
class OODParity:
    """One device's OOD score in numpy (device_agent.ood_score, from ood.npz) against torch's, on torch latents."""

    device: str
    samples: int
    max_abs_diff: float  # of s(z) in [0, 1]
    agreement: float  # fraction of inputs on the same side of s = 1/2 (the switch fedgate_switch would make)
    handed_off: float  # fraction with s > 1/2 in torch


@dataclass(frozen=True)
class ParityReport:
    """Everything `nmoe export` writes to report.json."""

    run_dir: str
    method: str
    max_accuracy_drop: float
    settings: dict[str, Any]
    machine: dict[str, Any]
    models: list[ModelParity]
    nmoe: list[NMoEParity]
    failures: list[str]
    ood: list[OODParity]


def latency_us(run: Callable[[], object]) -> tuple[float, float]:
    """Median and p99 wall time of `run` in microseconds, after a warm-up."""
    for _ in range(LATENCY_WARMUP):
        run()
    times = []
    for _ in range(LATENCY_RUNS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    us = np.asarray(times) * 1e6
    return float(np.median(us)), float(np.percentile(us, 99))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of matching rows."""
    dot = (a * b).sum(axis=1)
    return float(np.mean(dot / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)))


def top_k_sets(k: int) -> Callable[[np.ndarray, np.ndarray], float]:
    """Fraction of rows whose k largest entries are the same set."""
    def agree(a: np.ndarray, b: np.ndarray) -> float:
        def top(x: np.ndarray) -> np.ndarray:
            return np.sort(top_k_route(x, k)[0], axis=1)

        return float(np.mean(np.all(top(a) == top(b), axis=1)))
    return agree


def argmax_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of rows with the same argmax."""
    return float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))


def role_references(mods: DeviceModules, x: torch.Tensor) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per role: the input fed to the exported model and the torch fp32 output on it.

    Gate and expert get the torch latents, so each model's diff is its own, not the extractor's.
    """
    z = predict(mods.extractor, x)
    return {role: (x.numpy(), z.numpy()) if role == "extractor" else (z.numpy(), predict(m, z).numpy())
            for role, m in mods.roles().items()}


def model_parity(bundle: Bundle, entry: ModelEntry, reference: tuple[np.ndarray, np.ndarray]) -> ModelParity:
    """Max abs diff, agreement and batch-1 latency of one model file."""
    inputs, expected = reference
    runtime = open_runtime(bundle, entry, THREADS)
    got = runtime.run(inputs)
    kind, agree = {"extractor": ("cosine", cosine),
                   "gate": (f"top-{bundle.manifest.top_k} set", top_k_sets(bundle.manifest.top_k)),
                   "expert": ("argmax", argmax_agreement), "shared_expert": ("argmax", argmax_agreement)}[entry.role]
    one = inputs[:1]
    median, p99 = latency_us(lambda: runtime.run(one))
    return ModelParity(bundle.manifest.device_id, entry.role, entry.format, entry.precision, entry.file,
                       entry.bytes, len(inputs), float(np.abs(got - expected).max()), float(np.abs(expected).max()),
                       agree(got, expected), kind, median, p99)


def ood_parity(bundle: Bundle, mods: DeviceModules, x: torch.Tensor) -> OODParity:
    """The device's numpy OOD score against its torch one on the torch latents of x."""
    assert mods.ood is not None
    z = predict(mods.extractor, x)
    want, got = mods.ood(z).numpy(), OODScore.of(bundle)(z.numpy())
    return OODParity(bundle.manifest.device_id, len(z), float(np.abs(got - want).max()),
                     float(np.mean((got > 0.5) == (want > 0.5))), float(np.mean(want > 0.5)))


def expert_outputs(device: DeviceModules, fleet: list[DeviceModules], x: torch.Tensor) -> ExpertOutputs:
    """The device's torch latents of x and every expert's class probabilities on them (then the device's
    shared expert's, when it has one)."""
    z = predict(device.extractor, x)
    experts = [m.expert for m in fleet] + ([device.shared_expert] if device.shared_expert is not None else [])
    return ExpertOutputs(z, torch.stack([torch.softmax(predict(e, z), dim=-1) for e in experts], dim=1))


def fixed_router(experts: np.ndarray) -> Router:
    """The routing a device chose (RanGate draws), with its equal weights."""
    idx = torch.from_numpy(experts)
    return lambda z: (idx, torch.full(idx.shape, 1.0 / idx.shape[1]))


def nmoe_parity(fleet: LocalNMoE, c: int, mods: list[DeviceModules], data: FederatedData,
                fmt: str, precision: str, run_accuracy: float | None = None) -> NMoEParity:
    """Device c's NMoE accuracy with the bundles vs the torch fp32 NMoE, on its personalized test."""
    test = data.personal_test[c]
    images = raw_images(test.x, fleet.bundles[c].manifest.input)
    got = fleet.predict(c, images)
    router = fixed_router(got.experts) if mods[c].gate is None else mods[c].router(fleet.top_k, fleet.num_experts)
    want = nmoe_predict(router, expert_outputs(mods[c], mods, test.x))[0].argmax(dim=1).numpy()
    y = test.y.numpy()
    torch_acc, acc = 100 * float(np.mean(want == y)), 100 * float(np.mean(got.labels == y))
    median, p99 = latency_us(lambda: fleet.predict(c, images[:1]))
    size = sum(e.bytes for e in fleet.bundles[c].manifest.models if (e.format, e.precision) == (fmt, precision))
    return NMoEParity(fleet.bundles[c].manifest.device_id, fmt, precision, len(y), size, torch_acc, acc,
                      torch_acc - acc, float(np.mean(got.labels == want)), median, p99, run_accuracy)


def measure(bundles: dict[int, Bundle], mods: list[DeviceModules], data: FederatedData, formats: Sequence[str],
            precisions: Sequence[str], show_progress: bool = True, run_accuracy: Sequence[float] | None = None
            ) -> tuple[list[ModelParity], list[NMoEParity], list[OODParity]]:
    """Per-model parity for every device x role x format x precision, the OOD scores', then the fleet's
    NMoE parity (with `run_accuracy[c]`, device c's accuracy in percent as the run measured it, when given)."""
    variants = [(f, p) for f in formats for p in precisions]
    models = []
    ood = [ood_parity(b, mods[c], data.personal_test[c].x) for c, b in bundles.items() if mods[c].ood is not None]
    with progress_bar(len(bundles), "parity", "device", show_progress) as bar:
        for c, bundle in bundles.items():
            refs = role_references(mods[c], data.personal_test[c].x[:PARITY_SAMPLES])
            models += [model_parity(bundle, bundle.model(role, p, f), ref)
                       for f, p in variants for role, ref in refs.items()]
            bar.update(1)
    nmoe = []
    with progress_bar(len(variants) * len(bundles), "nmoe accuracy", "device", show_progress) as bar:
        for f, p in variants:
            fleet = LocalNMoE(bundles, p, f, intra_op_threads=THREADS)
            for c in bundles:
                nmoe.append(nmoe_parity(fleet, c, mods, data, f, p, None if run_accuracy is None else run_accuracy[c]))
                bar.update(1)
    return models, nmoe, ood


def accuracy_failures(nmoe: list[NMoEParity], max_drop: float) -> list[str]:
    """One message per device/format/precision whose accuracy drops more than max_drop points."""
    return [f"{r.device} {r.format} {r.precision}: NMoE accuracy {r.accuracy:.2f}% is {r.drop:.2f} points below "
            f"torch fp32 ({r.torch_accuracy:.2f}%), more than --max-accuracy-drop {max_drop:g}"
            for r in nmoe if r.drop > max_drop]


def runtime_versions() -> dict[str, str]:
    """Installed versions of the runtimes the parity runs use."""
    versions = {}
    for package in RUNTIME_PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return versions


def build_report(run_dir: Path, method: str, max_drop: float, models: list[ModelParity],
                 nmoe: list[NMoEParity], ood: list[OODParity]) -> ParityReport:
    """The report with its settings, machine (with runtime versions) and accuracy failures."""
    settings = {"parity_samples": PARITY_SAMPLES, "latency_warmup": LATENCY_WARMUP, "latency_runs": LATENCY_RUNS,
                "intra_op_threads": THREADS, "batch": 1}
    return ParityReport(str(run_dir), method, max_drop, settings, {**machine(), **runtime_versions()},
                        models, nmoe, accuracy_failures(nmoe, max_drop), ood)


def nmoe_table(report: ParityReport) -> str:
    """Markdown table of the NMoE rows (also the summary `nmoe export` prints)."""
    rows = ["| device | format | precision | MB | run % | torch fp32 % | bundle % | drop | agree % | p50 us | p99 us |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows += [f"| {r.device} | {r.format} | {r.precision} | {r.model_bytes / 1e6:.3f} | "
             f"{'-' if r.run_accuracy is None else f'{r.run_accuracy:.2f}'} | {r.torch_accuracy:.2f} | "
             f"{r.accuracy:.2f} | {r.drop:+.2f} | {100 * r.agreement:.1f} | {r.latency_us_median:.0f} | "
             f"{r.latency_us_p99:.0f} |" for r in report.nmoe]
    return "\n".join(rows)


def models_table(report: ParityReport) -> str:
    """Markdown table of the per-model rows."""
    rows = ["| device | role | format | precision | bytes | max abs diff | max abs torch | agreement | p50 us | p99 us |",
            "|---|---|---|---|---:|---:|---:|---|---:|---:|"]
    rows += [f"| {m.device} | {m.role} | {m.format} | {m.precision} | {m.bytes} | {m.max_abs_diff:.2e} | "
             f"{m.reference_max_abs:.3g} | "
             f"{_agreement(m)} | {m.latency_us_median:.1f} | {m.latency_us_p99:.1f} |" for m in report.models]
    return "\n".join(rows)


def ood_section(report: ParityReport) -> str:
    """Markdown of the OOD score rows ("" without any)."""
    if not report.ood:
        return ""
    rows = ["| device | samples | max abs diff of s | same side of 1/2 | s > 1/2 (torch) |", "|---|---:|---:|---:|---:|"]
    rows += [f"| {o.device} | {o.samples} | {o.max_abs_diff:.2e} | {100 * o.agreement:.1f}% | {100 * o.handed_off:.1f}% |"
             for o in report.ood]
    return ("## OOD score (numpy on the device vs torch, on the torch latents of the personalized test)\n\n"
            + "\n".join(rows) + "\n\n")


def _agreement(m: ModelParity) -> str:
    value = f"{m.agreement:.5f}" if m.agreement_kind == "cosine" else f"{100 * m.agreement:.1f}%"
    return f"{value} {m.agreement_kind}"


def write_report(report: ParityReport, out: Path) -> None:
    """report.json (every number) and report.md (tables) in the bundles folder."""
    write_json(out / "report.json", asdict(report))
    s = report.settings
    failures = "\n".join(f"- {f}" for f in report.failures) or "none"
    (out / "report.md").write_text(
        f"# Export parity: {report.method}\n\nRun dir: `{report.run_dir}`. Machine: {report.machine['processor']}, "
        f"{report.machine['cpus']} CPUs, "
        f"{', '.join(f'{k} {report.machine[k]}' for k in RUNTIME_PACKAGES if k in report.machine)}.\n\n"
        f"## NMoE accuracy per device (personalized test, every expert in-process)\n\n{nmoe_table(report)}\n\n"
        f"Latency: one image through preprocess, extractor, gate, top-k experts and combine "
        f"({s['latency_runs']} runs after {s['latency_warmup']} warm-up, {s['intra_op_threads']} thread).\n\n"
        f"## Models vs torch fp32 (up to {s['parity_samples']} personalized test samples)\n\n"
        f"{models_table(report)}\n\nGate and expert are fed the torch latents, so each diff is the model's own. "
        f"Latency: batch 1.\n\n{ood_section(report)}## Accuracy drops beyond {report.max_accuracy_drop:g} points\n\n{failures}\n")
