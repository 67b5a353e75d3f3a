"""The NMoE building blocks: feature extractor, expert, gate, top-k routing and the combine.

Layers are chosen to export cleanly to ONNX, ExecuTorch and LiteRT: stride-2 convolutions and
ReLU, no pooling, no batch norm (FedAvg over non-IID clients also dislikes BN statistics).
Inputs are normalized float tensors [B, C, H, W]; normalization lives outside the model (the
bundle manifest carries it).
"""

from __future__ import annotations

import torch
from torch import nn

GATE_FINAL_PREFIX = "final."  # FedGate keeps parameters under this prefix on the client


class Extractor(nn.Module):
    """Small CNN: three stride-2 3x3 convs (width, 2w, 4w channels) -> linear -> latent."""

    def __init__(self, input_shape: tuple[int, int, int], width: int, latent_dim: int) -> None:
        super().__init__()
        c = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *input_shape)).shape[1]
        self.project = nn.Linear(flat, latent_dim)
        self.input_shape = input_shape
        self.latent_dim = latent_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(x))


class Expert(nn.Module):
    """MLP latent -> class logits; one per client."""

    def __init__(self, latent_dim: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Gate(nn.Module):
    """MLP body + final layer: latent -> one logit per expert."""

    def __init__(self, latent_dim: int, hidden: int, num_experts: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU())
        self.final = nn.Linear(hidden, num_experts)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.final(self.body(z))


class DenseModel(nn.Module):
    """Extractor + expert-shaped head: the `local`/`fedavg` model and FedCE's temporary classifier."""

    def __init__(self, extractor: Extractor, head: Expert) -> None:
        super().__init__()
        self.extractor = extractor
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.extractor(x))


class ProjectionHead(nn.Module):
    """SimCLR projection MLP used only during FedSC; dropped afterwards."""

    def __init__(self, latent_dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, latent_dim), nn.ReLU(), nn.Linear(latent_dim, out_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def top_k_route(gate_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: indices [B, k] of the chosen experts and their softmax weights (sum to 1)."""
    values, idx = torch.topk(gate_logits, k, dim=-1)
    return idx, torch.softmax(values, dim=-1)


def combine(expert_probs: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """NMoE combine: sum_k weights[b,k] * expert_probs[b, idx[b,k], :] -> [B, classes].

    expert_probs is [B, E, C] (softmax outputs of every expert; only the chosen ones are read).
    """
    chosen = torch.gather(expert_probs, 1, idx.unsqueeze(-1).expand(-1, -1, expert_probs.shape[-1]))
    return (weights.unsqueeze(-1) * chosen).sum(dim=1)


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates for one sample through the model's Conv2d and Linear layers."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out[0].numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        total += m.in_features * m.out_features

    hooks = []
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            hooks.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_hook(linear_hook))
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    for h in hooks:
        h.remove()
    return total


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


class ContrastiveNet(nn.Module):
    """Stage-1 training wrapper: extractor + SimCLR projection (+ a CE head for `hybrid`)."""

    def __init__(self, extractor: Extractor, projection: ProjectionHead, head: Expert | None) -> None:
        super().__init__()
        self.extractor = extractor
        self.projection = projection
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extractor(x)
