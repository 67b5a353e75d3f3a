"""Accuracy of any method per client, NMoE routing/combination over precomputed expert outputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from toolkit.federated.summary import summarize
from toolkit.models import combine, top_k_route


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """Model outputs on x, in eval mode, batched."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy(scores: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy as a fraction."""
    return float((scores.argmax(dim=1) == y).float().mean())


Scores = Callable[[int, str], torch.Tensor]  # (client, "personal" | "global") -> class scores


def client_accuracies(num_clients: int, personal_y: list[torch.Tensor], global_y: torch.Tensor,
                      scores: Scores) -> dict[str, Any]:
    """Per-client and mean (over clients, unweighted) personalized and global accuracy."""
    return summarize([
        {"client": c,
         "personalized_accuracy": accuracy(scores(c, "personal"), personal_y[c]),
         "global_accuracy": accuracy(scores(c, "global"), global_y)}
        for c in range(num_clients)
    ])


@dataclass(frozen=True)
class ExpertOutputs:
    """Latents and every expert's class probabilities on one evaluation set."""

    z: torch.Tensor  # [N, D]
    probs: torch.Tensor  # [N, E, C]


Router = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # latents -> (idx [N,k], weights [N,k])


def gate_router(gate: nn.Module, k: int) -> Router:
    """Route by a trained gate's top-k."""
    return lambda z: top_k_route(predict(gate, z), k)


def random_router(num_experts: int, k: int, seed: int) -> Router:
    """RanGate: k distinct experts uniformly at random per input, equal weights 1/k."""
    def route(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.rand(len(z), num_experts, generator=gen).argsort(dim=1)[:, :k]
        return idx, torch.full((len(z), k), 1.0 / k)
    return route


def nmoe_predict(router: Router, out: ExpertOutputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Combined class probabilities [N, C] and the chosen expert indices [N, k]."""
    idx, weights = router(out.z)
    return combine(out.probs, idx, weights), idx


def routing_shares(idx: torch.Tensor, num_experts: int) -> list[float]:
    """Fraction of the top-k selections `idx` [N, k] that went to each expert."""
    counts = torch.bincount(idx.flatten(), minlength=num_experts).float()
    shares: list[float] = (counts / counts.sum()).tolist()
    return shares
