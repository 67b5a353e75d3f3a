"""device_agent.training.torch_stream against torch: the same permutations and uniform draws from a seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from device_agent.training.torch_stream import TorchStream, torch_order
from toolkit.evaluate import random_router
from toolkit.training import minibatches


@pytest.mark.parametrize("seed", [0, 7, 2**32 + 5, 2**62 + 12345])
def test_randperm_and_rand_follow_torchs_generator(seed: int) -> None:
    gen, stream = torch.Generator().manual_seed(seed), TorchStream(seed)
    for n in (0, 1, 2, 3, 64, 641, 6000):  # one generator, consumed in turn as a fit's epochs consume it
        assert np.array_equal(stream.randperm(n), torch.randperm(n, generator=gen).numpy()), n
    for shape in ((5, 3), (200, 10), (1,)):
        assert np.array_equal(stream.rand(*shape), torch.rand(*shape, generator=gen).numpy()), shape


def test_a_fits_batches_and_rangates_routing_are_the_simulations() -> None:
    gen, permute = torch.Generator().manual_seed(99), torch_order(99)
    for _ in range(3):  # epochs
        assert np.array_equal(torch.cat(list(minibatches(300, 64, gen))).numpy(), permute(300)[:300])
    idx, _ = random_router(10, 2, 1234)(torch.zeros(500, 4))
    assert np.array_equal(TorchStream(1234).rand(500, 10).argsort(axis=1)[:, :2], idx.numpy())
