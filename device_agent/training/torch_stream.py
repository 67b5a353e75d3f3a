"""torch's CPU random stream without torch: the same batch orders and uniform draws from the same seed.

torch's CPU generator is MT19937 seeded with the low 32 bits of the seed (init_genrand), as numpy's
legacy `RandomState(seed)`; one 32-bit output feeds each step of `torch.randperm` (Fisher-Yates:
swap i with i + r % (n - i)) and each float32 of `torch.rand` ((r & 0xFFFFFF) / 2**24). So a
numpy device shuffles its minibatches (toolkit.training.minibatches) and draws RanGate's routing
(toolkit.evaluate.random_router) exactly as the simulation does (tests/training/test_torch_stream.py
holds this against torch).
"""

from __future__ import annotations

import numpy as np

from device_agent.training.loop import Permute

_MASK32, _MASK24 = 0xFFFFFFFF, 0xFFFFFF


class TorchStream:
    """The outputs of `torch.Generator().manual_seed(seed)`, consumed as torch consumes them."""

    def __init__(self, seed: int) -> None:
        self._mt = np.random.RandomState(seed & _MASK32)

    def _u32(self, count: int) -> np.ndarray:
        return self._mt.randint(0, 1 << 32, size=count, dtype=np.uint32)

    def randperm(self, n: int) -> np.ndarray:
        """`torch.randperm(n, generator=g)` (int64)."""
        perm = np.arange(n, dtype=np.int64)
        if n < 2:
            return perm
        offsets = (self._u32(n - 1).astype(np.int64) % np.arange(n, 1, -1, dtype=np.int64)).tolist()
        for i, z in enumerate(offsets):
            j = i + z
            perm[i], perm[j] = perm[j], perm[i]
        return perm

    def rand(self, *shape: int) -> np.ndarray:
        """`torch.rand(*shape, generator=g)` (float32, row-major)."""
        count = int(np.prod(shape, dtype=np.int64))
        return ((self._u32(count) & _MASK24).astype(np.float64) / (1 << 24)).astype(np.float32).reshape(shape)


def torch_order(seed: int) -> Permute:
    """toolkit.training.minibatches' batch order: one generator per fit, one randperm per epoch."""
    return TorchStream(seed).randperm
