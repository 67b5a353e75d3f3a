"""Oracle-routing and best-expert-per-class ceilings."""

import torch

from toolkit.evaluate import ExpertOutputs, accuracy
from toolkit.gates.ceiling import (
    best_expert_per_class,
    ceiling_metrics,
    mean_ceilings,
    oracle_scores,
)


def one_hot_experts(answers: list[list[int]], num_classes: int) -> torch.Tensor:
    """[N, E, C] probabilities: expert e answers class answers[n][e] with probability 0.9."""
    n, e = len(answers), len(answers[0])
    probs = torch.full((n, e, num_classes), 0.1 / (num_classes - 1))
    for i, row in enumerate(answers):
        for j, c in enumerate(row):
            probs[i, j, c] = 0.9
    return probs


def test_oracle_finds_the_one_expert_that_knows() -> None:
    # 3 experts, 3 classes; for each input exactly one expert is right, in a different position each time
    probs = one_hot_experts([[0, 1, 1], [2, 1, 2], [0, 0, 2]], 3)
    y = torch.tensor([0, 1, 2])
    assert accuracy(oracle_scores(probs, y), y) == 1.0
    assert accuracy(probs[:, 0], y) < 1.0  # a fixed expert is not enough


def test_oracle_prefers_a_right_answer_to_a_higher_true_class_probability() -> None:
    probs = torch.tensor([[[0.45, 0.55, 0.0], [0.4, 0.3, 0.3]]])  # expert 0: 0.45 on class 0 but answers 1
    y = torch.tensor([0])
    assert accuracy(oracle_scores(probs, y), y) == 1.0


def test_best_expert_per_class_picks_the_specialist() -> None:
    # expert 0 knows class 0, expert 1 knows class 1, expert 2 is always wrong
    answers = [[0, 1, 1]] * 4 + [[0, 1, 0]] * 4
    probs = one_hot_experts(answers, 2)
    y = torch.tensor([0] * 4 + [1] * 4)
    assert best_expert_per_class(probs, y, 2).tolist() == [0, 1]


def test_ceilings_bound_a_fixed_router_and_the_devices_means_report_both_accuracies() -> None:
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(200, 4, 5, generator=gen), dim=-1)
    y = torch.randint(0, 5, (200,), generator=gen)
    z = torch.zeros(200, 2)
    public = ExpertOutputs(z, probs)
    devices = [ceiling_metrics(ExpertOutputs(z[:100], probs[:100]), y[:100], public, y),
               ceiling_metrics(ExpertOutputs(z[100:], probs[100:]), y[100:], public, y)]
    out = mean_ceilings(devices)
    fixed = max(accuracy(probs[:, e], y) for e in range(4))
    assert out["oracle_routing"]["global_accuracy"] >= out["best_expert_per_class"]["global_accuracy"] >= fixed
    assert devices[0]["ceiling.oracle_routing.global_accuracy"] == devices[1]["ceiling.oracle_routing.global_accuracy"]
    halves = [d["ceiling.oracle_routing.personalized_accuracy"] for d in devices]
    assert out["oracle_routing"]["personalized_accuracy"] == sum(halves) / 2
    assert halves[0] != halves[1]  # each device's own split
