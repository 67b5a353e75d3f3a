"""Non-IID partitions over clients and personalized test splits."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from toolkit.data import (
    label_distribution,
    partition,
    partition_dirichlet,
    partition_iid,
    partition_shards,
    personalized_test_indices,
)

SCHEMES = ["iid", "dirichlet", "shards"]


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 10, 3000)


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)  # sorted, no duplicates inside
    everything = np.concatenate(parts)
    assert len(everything) == n and np.array_equal(np.sort(everything), np.arange(n))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partition_covers_each_index_once(labels: np.ndarray, scheme: str) -> None:
    parts = partition(labels, scheme, num_clients=7, seed=1)
    assert len(parts) == 7
    _assert_exact_cover(parts, len(labels))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partition_is_deterministic_by_seed(labels: np.ndarray, scheme: str) -> None:
    a, b = partition(labels, scheme, 7, seed=5), partition(labels, scheme, 7, seed=5)
    c = partition(labels, scheme, 7, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_sizes_are_equal_and_mixes_global(labels: np.ndarray) -> None:
    parts = partition_iid(labels, 6, seed=0)
    assert {len(p) for p in parts} == {500}
    glob = label_distribution(labels, 10)
    assert all(0.5 * np.abs(label_distribution(labels[p], 10) - glob).sum() < 0.1 for p in parts)


@pytest.fixture(scope="module")
def many_labels() -> np.ndarray:
    return np.random.default_rng(1).permutation(np.arange(20000) % 10)


def test_dirichlet_skew_follows_alpha(many_labels: np.ndarray) -> None:
    def mean_max_share(alpha: float) -> float:
        parts = partition_dirichlet(many_labels, 20, alpha, seed=0)
        return float(np.mean([label_distribution(many_labels[p], 10).max() for p in parts]))

    assert mean_max_share(0.1) > 0.5
    assert mean_max_share(10.0) < 0.2
    glob = label_distribution(many_labels, 10)
    for p in partition_dirichlet(many_labels, 20, 100.0, seed=0):
        assert 0.5 * np.abs(label_distribution(many_labels[p], 10) - glob).sum() < 0.1


def test_dirichlet_min_size_is_respected(many_labels: np.ndarray) -> None:
    unconstrained = partition_dirichlet(many_labels, 20, alpha=0.1, seed=0, min_size=0)
    assert min(len(p) for p in unconstrained) < 100  # so min_size=100 below forces resampling
    parts = partition_dirichlet(many_labels, 20, alpha=0.1, seed=0, min_size=100)
    assert min(len(p) for p in parts) >= 100
    _assert_exact_cover(parts, len(many_labels))


def test_dirichlet_unreachable_min_size_names_alpha_and_min_size() -> None:
    one_class = np.zeros(100, dtype=np.int64)
    with pytest.raises(ValueError, match=r"alpha=0\.01.*min_size=10"):
        partition_dirichlet(one_class, 10, alpha=0.01, seed=0, min_size=10)


@pytest.mark.parametrize("classes_per_client", [1, 2, 3, 10])
def test_shards_give_each_client_its_class_count(labels: np.ndarray,
                                                 classes_per_client: int) -> None:
    parts = partition_shards(labels, 10, classes_per_client, seed=0)
    assert all(len(np.unique(labels[p])) == classes_per_client for p in parts)
    _assert_exact_cover(parts, len(labels))


def test_shards_split_each_class_evenly(labels: np.ndarray) -> None:
    parts = partition_shards(labels, 5, 4, seed=3)  # 20 slots over 10 classes: 2 holders each
    for k in range(10):
        sizes = [int((labels[p] == k).sum()) for p in parts if (labels[p] == k).any()]
        assert len(sizes) == 2 and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(("call", "message"), [
    (lambda y: partition_iid(y, 0, seed=0), "num_clients"),
    (lambda y: partition_iid(y, 31, seed=0), "more clients"),
    (lambda y: partition_dirichlet(y, 5, alpha=0.0, seed=0), "alpha"),
    (lambda y: partition_dirichlet(y, 5, alpha=-1.0, seed=0), "alpha"),
    (lambda y: partition_dirichlet(y, 5, alpha=1.0, seed=0, min_size=7), "min_size"),
    (lambda y: partition_shards(y, 5, 0, seed=0), "classes_per_client"),
    (lambda y: partition_shards(y, 5, 4, seed=0), "classes_per_client"),
    (lambda y: partition_shards(y, 2, 1, seed=0), "cannot cover"),
    (lambda y: partition(y, "random", 2, seed=0), "iid, dirichlet, shards"),
])
def test_invalid_arguments_raise(call: Callable[[np.ndarray], object], message: str) -> None:
    y = np.arange(30) % 3
    with pytest.raises(ValueError, match=message):
        call(y)


def test_shards_with_too_few_samples_per_holder_raise() -> None:
    with pytest.raises(ValueError, match="samples but"):
        partition_shards(np.array([0, 0, 0, 0, 0, 1]), 4, 1, seed=0)


@settings(max_examples=150, deadline=None)
@given(raw=st.lists(st.integers(0, 5), min_size=1, max_size=60),
       num_clients=st.integers(1, 8), scheme=st.sampled_from(SCHEMES),
       classes_per_client=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_partition_coverage_property(raw: list[int], num_clients: int, scheme: str,
                                     classes_per_client: int, seed: int) -> None:
    labels = np.array(raw)
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    assume(num_clients <= len(labels))
    if scheme == "shards":  # preconditions under which shards must succeed
        holders = -(-num_clients * classes_per_client // len(counts))
        assume(classes_per_client <= len(counts) <= num_clients * classes_per_client)
        assume(counts.min() >= holders)
    parts = partition(labels, scheme, num_clients, seed, alpha=0.5,
                      classes_per_client=classes_per_client, min_size=0)
    assert len(parts) == num_clients
    _assert_exact_cover(parts, len(labels))


def test_label_distribution() -> None:
    dist = label_distribution(np.array([0, 0, 1, 3]), 5)
    assert dist.tolist() == [0.5, 0.25, 0.0, 0.25, 0.0]
    with pytest.raises(ValueError):
        label_distribution(np.array([0, 5]), 5)


@pytest.fixture(scope="module")
def test_labels() -> np.ndarray:
    return np.random.default_rng(4).permutation(np.arange(5000) % 10)


@pytest.mark.parametrize("seed", range(5))
def test_personalized_split_follows_train_mix(test_labels: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    train = rng.choice(10, 700, p=rng.dirichlet(np.full(10, 0.3)))
    size = 300
    idx = personalized_test_indices(test_labels, train, 10, size, seed)
    assert len(idx) == size and idx.dtype == np.int64
    assert np.all(np.diff(idx) > 0)  # sorted, without replacement
    want = label_distribution(train, 10)
    got = label_distribution(test_labels[idx], 10)
    assert np.all(np.abs(got - want) <= 1 / size + 1e-9)
    assert set(test_labels[idx]) <= set(np.flatnonzero(want))
    again = personalized_test_indices(test_labels, train, 10, size, seed)
    assert np.array_equal(idx, again)
    assert not np.array_equal(idx, personalized_test_indices(test_labels, train, 10, size, seed + 1))


def test_personalized_split_redistributes_shortfall() -> None:
    test = np.array([0] * 5 + [1] * 100 + [2] * 100 + [3] * 100)
    train = np.array([0] * 50 + [1] * 25 + [2] * 25)  # wants 50% class 0, absent class 3
    idx = personalized_test_indices(test, train, 4, 45, seed=0)
    counts = np.bincount(test[idx], minlength=4).tolist()
    assert counts == [5, 20, 20, 0]  # all of class 0, the rest split 1:1, class 3 never drawn


def test_personalized_split_too_large_raises() -> None:
    test = np.array([0] * 5 + [1] * 5 + [2] * 100)
    with pytest.raises(ValueError, match="size"):
        personalized_test_indices(test, np.array([0, 1]), 3, 11, seed=0)
