"""Device trainer speed: seconds per epoch of the MLP stages, numpy backend vs torch backend.

    .venv/bin/python -m bench.trainer [--config configs/quick.toml] [--samples 6000] [--repeats 5]

The sizes are the config's (latent_dim, expert_hidden, gate_hidden, num_clients experts, the
expert and gate batch sizes and optimizers); `--samples` latents of one device (the quick config's
Fashion-MNIST split gives a client 6000 on average). Each backend runs one-epoch fits through the
trainer seam (device_agent.training.load_trainer), and the same fits run as the in-process
simulation calls them (toolkit.training at torch's default thread count); after one warm-up fit
each, the medians are printed as a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from device_agent.training import EXPERT, GATE, Dims, OptimSpec, load_trainer
from toolkit import training
from toolkit.config import load
from toolkit.models import Expert, Gate

CLASSES = 10


def median_seconds(fit: Callable[[], object], repeats: int) -> float:
    fit()  # warm-up: first calls allocate and initialize kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fit()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quick.toml")
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cfg = load(args.config)
    m, n = cfg.model, args.samples
    rng = np.random.default_rng(0)
    z = rng.standard_normal((n, m.latent_dim)).astype(np.float32)
    y = rng.integers(0, CLASSES, n)
    logits = rng.standard_normal((n, cfg.data.num_clients, CLASSES))
    probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    expert = EXPERT.init(Dims(m.latent_dim, m.expert_hidden, CLASSES), rng)
    gate = GATE.init(Dims(m.latent_dim, m.gate_hidden, cfg.data.num_clients), rng)
    e, g = cfg.expert, cfg.gate
    expert_optim = OptimSpec("adam", e.lr, weight_decay=e.weight_decay)
    gate_optim = OptimSpec("adam", g.lr, weight_decay=g.weight_decay)

    load_start = os.getloadavg()
    rows = []
    for backend in ("numpy", "torch"):
        trainer = load_trainer(backend)
        expert_task = trainer.expert_task(1, e.batch_size, expert_optim)
        gate_task = trainer.gate_task(1, g.batch_size, gate_optim)
        gate_s = median_seconds(partial(gate_task.fit, gate, z, probs, y, 0), args.repeats)
        expert_s = median_seconds(partial(expert_task.fit, expert, z, y, 0), args.repeats)
        rows.append(f"| {backend} backend (seam, one BLAS/torch thread) | {1000 * gate_s:.1f} | {1000 * expert_s:.1f} |")
    # the in-process simulation's call, at torch's default thread count
    sim_gate = training.GateTask(lambda: Gate(m.latent_dim, m.gate_hidden, cfg.data.num_clients), 1, g.batch_size,
                                 training.OptimSpec("adam", g.lr, weight_decay=g.weight_decay))
    sim_expert = training.SupervisedTask(lambda: Expert(m.latent_dim, m.expert_hidden, CLASSES), 1, e.batch_size,
                                         training.OptimSpec("adam", e.lr, weight_decay=e.weight_decay))
    gate_data = training.GateData(torch.tensor(z), torch.tensor(probs), torch.tensor(y))
    expert_data = training.TensorData(torch.tensor(z), torch.tensor(y))
    gate_s = median_seconds(partial(sim_gate.fit, gate, gate_data, 0), args.repeats)
    expert_s = median_seconds(partial(sim_expert.fit, expert, expert_data, 0), args.repeats)
    rows.append(f"| toolkit.training in-process ({torch.get_num_threads()} torch threads) "
                f"| {1000 * gate_s:.1f} | {1000 * expert_s:.1f} |")
    print(f"{n} latents of dim {m.latent_dim}; gate {m.latent_dim}-{m.gate_hidden}-{cfg.data.num_clients} "
          f"batch {g.batch_size}; expert {m.latent_dim}-{m.expert_hidden}-{CLASSES} batch {e.batch_size}; Adam; "
          f"median of {args.repeats} one-epoch fits\n")
    print("| backend | gate ms/epoch | expert ms/epoch |\n|---|---|---|")
    print("\n".join(rows))
    print(f"\nload average 1/5/15 min: {' / '.join(f'{x:.2f}' for x in load_start)} at start, "
          f"{' / '.join(f'{x:.2f}' for x in os.getloadavg())} at the end, on {os.cpu_count()} cores; "
          f"numpy {np.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
