"""Top-k routing and the NMoE combine."""

import torch

from toolkit.evaluate import ExpertOutputs, nmoe_predict, random_router, routing_shares
from toolkit.models import Expert, Extractor, Gate, combine, count_macs, top_k_route


def test_top_k_weights_sum_to_one_and_pick_the_largest() -> None:
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    for k in (1, 2, 3, 10):
        idx, w = top_k_route(logits, k)
        assert idx.shape == w.shape == (64, k)
        torch.testing.assert_close(w.sum(dim=1), torch.ones(64))
        assert (w >= 0).all()
        expected = logits.topk(k, dim=1).indices
        assert torch.equal(idx, expected)


def test_top1_weight_is_one() -> None:
    _, w = top_k_route(torch.randn(5, 4), 1)
    assert torch.equal(w, torch.ones(5, 1))


def test_combine_is_the_weighted_sum_of_chosen_experts() -> None:
    probs = torch.softmax(torch.randn(3, 4, 5), dim=-1)  # [B, E, C]
    idx = torch.tensor([[0, 2], [3, 1], [1, 0]])
    w = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.9, 0.1]])
    out = combine(probs, idx, w)
    for b in range(3):
        manual = w[b, 0] * probs[b, idx[b, 0]] + w[b, 1] * probs[b, idx[b, 1]]
        torch.testing.assert_close(out[b], manual)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(3))


def test_random_router_is_uniform_distinct_and_seeded() -> None:
    z = torch.zeros(4000, 8)
    idx, w = random_router(10, 3, seed=1)(z)
    assert torch.equal(idx, random_router(10, 3, seed=1)(z)[0])
    assert all(len(set(row.tolist())) == 3 for row in idx)
    torch.testing.assert_close(w, torch.full_like(w, 1 / 3))
    freq = torch.bincount(idx.flatten(), minlength=10).float() / idx.numel()
    assert (freq - 0.1).abs().max() < 0.02


def test_routing_shares_sum_to_one_and_count_selections() -> None:
    z = torch.randn(50, 8)
    out = ExpertOutputs(z, torch.softmax(torch.randn(50, 4, 3), -1))
    gate = Gate(8, 6, 4)
    from toolkit.evaluate import gate_router
    _, idx = nmoe_predict(gate_router(gate, 2), out)
    shares = routing_shares(idx, 4)
    assert len(shares) == 4 and abs(sum(shares) - 1) < 1e-6
    assert routing_shares(torch.tensor([[0, 3], [3, 1]]), 4) == [0.25, 0.25, 0.0, 0.5]


def test_mac_counts_match_layer_arithmetic() -> None:
    ext = Extractor((1, 28, 28), 4, 16)
    # 28->14->7->4 with stride-2 3x3 convs, padding 1
    convs = 14 * 14 * 4 * 1 * 9 + 7 * 7 * 8 * 4 * 9 + 4 * 4 * 16 * 8 * 9
    assert count_macs(ext, (1, 28, 28)) == convs + 16 * 4 * 4 * 16
    assert count_macs(Expert(16, 32, 10), (16,)) == 16 * 32 + 32 * 10
    assert count_macs(Gate(16, 8, 5), (16,)) == 16 * 8 + 8 * 5
