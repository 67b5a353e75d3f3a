"""Gate methods that know what they do not know, on top of one Stage-1 extractor and its experts.

Every method here adds to FedGate (gate body averaged, final layer never leaves the device) one way
of handling inputs of classes a device never saw:

- `fedgate_ood`: FedGate's gates unchanged, plus an out-of-distribution fallback to a **shared
  expert** (the Stage-1 FedAvg classifier head, which every device already has): per input, the
  Mahalanobis distance of its latent to the device's own class means (shared covariance) sets how much
  weight goes to the shared expert instead of the gate's top-k. Means, covariance and the threshold
  come from the device's own data (threshold: a quantile of the scores of a held-out part of it), so
  nothing new leaves the device. Sources: Lee et al. 2018 (Mahalanobis score); FedTHE (Jiang & Lin,
  ICLR 2023) and PFL-MoE (Guo et al. 2021) for mixing a global and a personal model per input.
- `fedgate_vl` / `localgate_vl`: devices share per-class latent statistics (counts, means,
  covariances); the server pools them exactly (CCVR, Luo et al. NeurIPS 2021), recalibrates the
  shared expert's last layer on virtual latents drawn from the pool (CCVR), and every device adds a
  common set of virtual latents of *every* class to its gate's training data, so its final layer
  learns where unfamiliar latents should go. The gate routes over the peers' experts **plus the
  shared expert** (an always-available local expert, as in shared-expert MoE designs, e.g.
  DeepSeekMoE). `localgate_vl` is the same with nothing averaged.
- `fedgate_heldout`: PFL-MoE's recipe: each expert trains on (1 - f) of its device's data and the
  gate on the held-out f, so the gate does not learn from an expert that has memorised its inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from toolkit.evaluate import ExpertOutputs, Router
from toolkit.federated import NoSharing, Params, PartialSync, Strategy
from toolkit.gates.stats import Mahalanobis, class_stats
from toolkit.models import GATE_FINAL_PREFIX, Expert
from toolkit.torch_params import get_params, set_params

CCVR_EPOCHS = 5  # last-layer recalibration of the shared expert on virtual latents (CCVR)
CCVR_LR = 1e-3
MIN_KNOWN_FRACTION = 0.01  # a class with less than this share of a device's data is not 'known' to its OOD score


@dataclass(frozen=True)
class GateMethod:
    """One extended gate method: its aggregation strategy (None: it trains no gate of its own) and
    what it adds to FedGate."""

    strategy: Callable[[], Strategy] | None
    kind: str  # "ood" | "virtual" | "heldout" | "switch"


EXTENDED_GATES: dict[str, GateMethod] = {
    "fedgate_ood": GateMethod(lambda: PartialSync((GATE_FINAL_PREFIX,)), "ood"),
    "fedgate_vl": GateMethod(lambda: PartialSync((GATE_FINAL_PREFIX,)), "virtual"),
    "localgate_vl": GateMethod(NoSharing, "virtual"),
    "fedgate_heldout": GateMethod(lambda: PartialSync((GATE_FINAL_PREFIX,)), "heldout"),
    "fedgate_switch": GateMethod(None, "switch"),  # fedgate's gate for familiar inputs, fedgate_vl's for the rest
}
SWITCHED = ("fedgate", "fedgate_vl")  # fedgate_switch's (familiar, unfamiliar) gates, trained before it


def with_expert(out: ExpertOutputs, extra: torch.Tensor) -> ExpertOutputs:
    """The same outputs with one more expert's class probabilities [N, C] appended (index E)."""
    return ExpertOutputs(out.z, torch.cat([out.probs, extra.unsqueeze(1)], dim=1))


def fallback_router(route: Router, score: Callable[[torch.Tensor], torch.Tensor], shared_index: int) -> Router:
    """Top-k of `route` with weights (1 - s), plus the shared expert with weight s = score(z) in [0, 1]."""
    def routed(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx, weights = route(z)
        s = score(z).unsqueeze(1)
        shared = torch.full((len(z), 1), shared_index, dtype=idx.dtype)
        return torch.cat([idx, shared], dim=1), torch.cat([(1 - s) * weights, s], dim=1)
    return routed


def switch_router(familiar: Router, unfamiliar: Router, score: Callable[[torch.Tensor], torch.Tensor]) -> Router:
    """Per input, `unfamiliar`'s top-k where score(z) > 1/2, else `familiar`'s (so k experts per input)."""
    def routed(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        far = (score(z) > 0.5).unsqueeze(1)
        (i1, w1), (i2, w2) = familiar(z), unfamiliar(z)
        return torch.where(far, i2, i1), torch.where(far, w2, w1)
    return routed


@dataclass(frozen=True)
class OODScore:
    """s(z) = sigmoid((d(z) - tau) / (temperature * spread)): ~0 for familiar latents, ~1 for far ones.

    d is the Mahalanobis distance to the device's known classes; tau the `quantile` of d over a
    held-out part of the device's data, spread = tau - median of those held-out distances.
    """

    maha: Mahalanobis
    tau: float
    spread: float
    temperature: float

    @classmethod
    def fit(cls, z: torch.Tensor, y: torch.Tensor, num_classes: int, heldout: float, quantile: float,
            temperature: float, seed: int) -> OODScore:
        fit_idx, held_idx = split(len(y), heldout, seed)
        stats = class_stats(z[fit_idx], y[fit_idx], num_classes)
        maha = Mahalanobis.fit(stats, min_count=max(2, round(MIN_KNOWN_FRACTION * len(fit_idx))))
        held = maha.score(z[held_idx])
        tau = float(torch.quantile(held, quantile))
        spread = max(tau - float(held.median()), 1e-6)
        return cls(maha, tau, spread, temperature)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((self.maha.score(z) - self.tau) / (self.temperature * self.spread))


def split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (kept, held-out) index split with round(fraction * n) held out (at least 1 of each)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = min(max(1, round(fraction * n)), n - 1)
    return perm[cut:], perm[:cut]


def ccvr_calibrated(expert: Expert, head: Params, vz: torch.Tensor, vy: torch.Tensor, batch_size: int,
                    seed: int) -> Params:
    """CCVR: the shared expert's last layer retrained on virtual latents (the rest frozen), seeded."""
    model = set_params(expert, head)
    last = model.net[-1]
    opt = torch.optim.Adam(last.parameters(), lr=CCVR_LR)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        hidden = model.net[:-1](vz)
    for _ in range(CCVR_EPOCHS):
        for idx in torch.randperm(len(vy), generator=gen).split(batch_size):
            loss = F.cross_entropy(last(hidden[idx]), vy[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return get_params(model)


def true_class_table(answers: torch.Tensor, vy: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[M, E, C] expert outputs for a gate's training data from true-class probabilities [M, E] only
    (the gate's loss, toolkit.training.mixture_nll, reads nothing else)."""
    probs = torch.zeros(len(vy), answers.shape[1], num_classes)
    probs[torch.arange(len(vy)), :, vy] = answers
    return probs
