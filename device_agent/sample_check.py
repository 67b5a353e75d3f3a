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
    """BundleError (one line) unless every model reproduces the samples; nothing to check without them."""
    if bundle.manifest.samples is None:
        return
    samples = bundle.samples()
    roles: dict[str, Runtime | None] = {"extractor": models.extractor, "gate": models.gate, "expert": models.expert,
                                        "shared_expert": models.shared_expert}
    for role, runtime in roles.items():
        if runtime is None:
            continue
        expected = samples.get(EXPECTED[role])
        if expected is None:
            raise BundleError(f"{bundle.path / 'samples.npz'}: no {EXPECTED[role]!r} to check the {role} against")
        output = runtime.run(model_input(bundle, role, samples))
        if role in EXPERT_ROLES:
            output = softmax(output)
        if output.shape != expected.shape:
            raise BundleError(f"{bundle.path / 'samples.npz'}: the {role} gives {list(output.shape)} for the "
                              f"samples, {EXPECTED[role]} is {list(expected.shape)}")
        tolerance = _tolerance(bundle, role, models.format, expected)
        diff = float(np.abs(output - expected).max())
        if not diff <= tolerance:  # NaN fails
            raise BundleError(
                f"{bundle.path / 'samples.npz'}: the {role} ({models.format}) differs from the expected "
                f"{EXPECTED[role]} by {diff:.3g} (at most {tolerance:.3g} allowed): the runtime or the samples "
                "are wrong; check with python -m device_agent.selfcheck")


def _tolerance(bundle: Bundle, role: str, format: str, expected: np.ndarray) -> float:
    int8 = any((e.role, e.format, e.precision) == (role, format, "int8") for e in bundle.manifest.models)
    if not int8:
        return FP32_TOLERANCE
    return max(FP32_TOLERANCE, INT8_RELATIVE_TOLERANCE * float(np.abs(expected).max()))
