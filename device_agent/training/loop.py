"""The local training loop of toolkit.training.optimize, over numpy parameters.

Batch order: `order(seed)` gives the permutation function of one fit, called once per epoch with
the sample count. The default is numpy's (`np.random.default_rng(seed).permutation`); a caller
that passes the same function as another trainer sees exactly the same batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from threadpoolctl import threadpool_limits

from device_agent.training.mlp import Params
from device_agent.training.optim import OptimSpec, clip_grad_norm

Permute = Callable[[int], np.ndarray]  # n -> a permutation of 0..n-1
Order = Callable[[int], Permute]  # seed -> the permutations of one fit, one call per epoch
BatchLoss = Callable[[Params, np.ndarray], tuple[float, Params]]  # (params, indices) -> (loss, grads)


def numpy_order(seed: int) -> Permute:
    """The default batch order: numpy's PCG64 stream seeded with `seed`."""
    return np.random.default_rng(seed).permutation


def minibatches(n: int, batch_size: int, permute: Permute) -> Iterator[np.ndarray]:
    """Shuffled index batches covering 0..n-1; a trailing batch of one sample is dropped."""
    perm = permute(n)
    for start in range(0, n, batch_size):
        idx = perm[start:start + batch_size]
        if len(idx) > 1:
            yield idx


def optimize(params: Params, optim: OptimSpec, epochs: int, batch_size: int, n: int, seed: int,
             batch_loss: BatchLoss, order: Order = numpy_order) -> dict[str, float]:
    """`epochs` passes of shuffled minibatches over n samples, updating `params` in place.

    Each step: loss and gradients, clipping of the total gradient norm to optim.grad_clip, one step
    of a fresh optimizer. Returns {"loss": mean loss over the samples seen, weighted by batch size}.
    BLAS runs on one thread meanwhile: for matrices this small more threads only contend with each
    other and with the agent (45x slower per epoch on a loaded 2-core machine, bench/trainer.py).
    """
    opt, permute = optim.make(), order(seed)
    total, count = 0.0, 0
    with threadpool_limits(limits=1, user_api="blas"):
        for _ in range(epochs):
            for idx in minibatches(n, batch_size, permute):
                loss, grads = batch_loss(params, idx)
                clip_grad_norm(grads, optim.grad_clip)
                opt.step(params, grads)
                total, count = total + loss * len(idx), count + len(idx)
    return {"loss": total / max(count, 1)}
