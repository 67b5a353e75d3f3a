"""How much of the NMoE gap is routing and how much is the experts: two label-aware ceilings.

- **oracle routing**: each test input goes to an expert whose answer is its *true* class, if any
  expert's is (the one most confident in it; else the one giving the true class the highest
  probability). Top-k routing with free weights can put all weight on one expert, so no gate does
  better with these experts, except on the rare inputs that a mixture gets right and no single
  expert does.
- **best expert per class**: every input of class y goes to the single expert that is most accurate
  on class y over the balanced global test set. A router that recognises the class perfectly but
  uses one expert per class reaches this.

Both use test labels, so they are ceilings to compare with, never methods.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from toolkit.evaluate import ExpertOutputs, accuracy


def true_class_probs(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[N, E]: every expert's probability of each input's true class."""
    return probs[torch.arange(len(y)), :, y]


def oracle_scores(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[N, C] class probabilities of oracle routing: per input the expert that answers y (if any) most surely."""
    p_true = true_class_probs(probs, y)
    right = (probs.argmax(dim=2) == y.unsqueeze(1)).float()
    pick = (2 * right + p_true).argmax(dim=1)
    return probs[torch.arange(len(y)), pick]


def best_expert_per_class(probs: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C]: for each class, the expert most accurate on that class's inputs (ties: lowest index)."""
    correct = (probs.argmax(dim=2) == y.unsqueeze(1)).float()  # [N, E]
    per_class = torch.zeros(num_classes, probs.shape[1]).index_add_(0, y, correct)
    return per_class.argmax(dim=1)


def class_expert_scores(probs: torch.Tensor, y: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """[N, C] class probabilities of the expert `pick[y]` chosen for each input's class."""
    return probs[torch.arange(len(y)), pick[y]]


CEILING = "ceiling."  # metric `ceiling.<rule>.<accuracy>` of a device's NMoE evaluation
RULES = ("oracle_routing", "best_expert_per_class")


def ceiling_metrics(personal: ExpertOutputs, personal_y: torch.Tensor, public: ExpertOutputs,
                    public_y: torch.Tensor) -> dict[str, float]:
    """One device's ceilings: oracle routing and best expert per class on its own test split and on
    the public test set (the per-class choice of experts comes from the public set, so every device
    makes the same one)."""
    pick = best_expert_per_class(public.probs, public_y, public.probs.shape[2])
    rules: dict[str, Callable[[ExpertOutputs, torch.Tensor], torch.Tensor]] = {
        "oracle_routing": lambda out, y: oracle_scores(out.probs, y),
        "best_expert_per_class": lambda out, y: class_expert_scores(out.probs, y, pick)}
    metrics = {}
    for name, scores in rules.items():
        metrics[f"{CEILING}{name}.personalized_accuracy"] = accuracy(scores(personal, personal_y), personal_y)
        metrics[f"{CEILING}{name}.global_accuracy"] = accuracy(scores(public, public_y), public_y)
    return metrics


def mean_ceilings(per_device: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """{rule: {accuracy: mean over devices}} from the devices' `ceiling.*` metrics."""
    return {rule: {kind: sum(m[f"{CEILING}{rule}.{kind}"] for m in per_device) / len(per_device)
                   for kind in ("personalized_accuracy", "global_accuracy")} for rule in RULES}
