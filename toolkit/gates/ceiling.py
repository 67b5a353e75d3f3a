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


def ceilings(personal: list[ExpertOutputs], personal_y: list[torch.Tensor], global_: ExpertOutputs,
             global_y: torch.Tensor) -> dict[str, dict[str, float]]:
    """Oracle-routing and best-expert-per-class accuracy, personalized (mean over clients) and global.

    Both ceilings route the same way on every client, so their global accuracy is one number.
    """
    num_classes = global_.probs.shape[2]
    pick = best_expert_per_class(global_.probs, global_y, num_classes)
    rules = {
        "oracle_routing": lambda out, y: oracle_scores(out.probs, y),
        "best_expert_per_class": lambda out, y: class_expert_scores(out.probs, y, pick),
    }
    result = {}
    for name, scores in rules.items():
        pers = [accuracy(scores(out, y), y) for out, y in zip(personal, personal_y)]
        result[name] = {"personalized_accuracy": sum(pers) / len(pers),
                        "global_accuracy": accuracy(scores(global_, global_y), global_y)}
    result["best_expert_per_class"]["experts"] = pick.tolist()
    return result
