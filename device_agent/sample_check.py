"""The agent's start-up check: its own models reproduce its bundle's `samples.npz` (docs/bundle.md).

The same comparison as `python -m device_agent.selfcheck`, on the models the agent has already
opened: the extractor on the preprocessed sample images, the gate and the expert on the stored fp32
latents, compared with the stored torch fp32 outputs (the expert after its softmax). fp32 models
must match within `FP32_TOLERANCE`. A device whose bundle also has int8 models of its format may be
running them (`DeviceModels` does not say which precision it opened), so there the bound is the
larger of that and `INT8_RELATIVE_TOLERANCE` of the largest expected magnitude (int8 models of the
tiny and Fashion-MNIST runs stay within 2.5%).
"""

from __future__ import annotations

import numpy as np

from device_agent.bundle import Bundle, BundleError
from device_agent.device_models import DeviceModels
from device_agent.nmoe_local import softmax
from device_agent.runtime import Runtime
from device_agent.selfcheck import EXPECTED, EXPERT_ROLES, FP32_TOLERANCE, model_input

INT8_RELATIVE_TOLERANCE = 0.1


def check_against_samples(bundle: Bundle, models: DeviceModels) -> None:
    """BundleError (one line) unless every model (and an OOD score) reproduces the samples; nothing to
    check without them."""
    if bundle.manifest.samples is None:
        return
    samples = bundle.samples()
    roles: dict[str, Runtime | None] = {"extractor": models.extractor, "gate": models.gate, "expert": models.expert,
                                        "shared_expert": models.shared_expert}
    for role, runtime in roles.items():
        if runtime is None:
            continue
        expected = _expected(bundle, samples, EXPECTED[role], role)
        output = runtime.run(model_input(bundle, role, samples))
        if role in EXPERT_ROLES:
            output = softmax(output)
        _compare(bundle, f"{role} ({models.format})", output, EXPECTED[role], expected,
                 _tolerance(bundle, role, models.format, expected))
    if models.ood is not None:  # numpy on the stored latents: no quantization involved
        expected = _expected(bundle, samples, "ood_score", "OOD score")
        _compare(bundle, "OOD score", models.ood(model_input(bundle, "gate", samples)), "ood_score", expected,
                 FP32_TOLERANCE)


def _expected(bundle: Bundle, samples: dict[str, np.ndarray], key: str, what: str) -> np.ndarray:
    if key not in samples:
        raise BundleError(f"{bundle.path / 'samples.npz'}: no {key!r} to check the {what} against")
    return samples[key]


def _compare(bundle: Bundle, what: str, output: np.ndarray, key: str, expected: np.ndarray, tolerance: float) -> None:
    """BundleError unless `output` has the shape of samples[key] and is within `tolerance` of it."""
    if output.shape != expected.shape:
        raise BundleError(f"{bundle.path / 'samples.npz'}: the {what} gives {list(output.shape)} for the "
                          f"samples, {key} is {list(expected.shape)}")
    diff = float(np.abs(output - expected).max())
    if not diff <= tolerance:  # NaN fails
        raise BundleError(
            f"{bundle.path / 'samples.npz'}: the {what} differs from the expected {key} by {diff:.3g} "
            f"(at most {tolerance:.3g} allowed): the runtime or the samples are wrong; check with "
            "python -m device_agent.selfcheck")


def _tolerance(bundle: Bundle, role: str, format: str, expected: np.ndarray) -> float:
    int8 = any((e.role, e.format, e.precision) == (role, format, "int8") for e in bundle.manifest.models)
    if not int8:
        return FP32_TOLERANCE
    return max(FP32_TOLERANCE, INT8_RELATIVE_TOLERANCE * float(np.abs(expected).max()))
