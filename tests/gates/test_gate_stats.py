"""Class statistics: pooling is exact, uploads round-trip, virtual latents follow the pool, Mahalanobis."""

import torch

from toolkit.gates.stats import (
    Mahalanobis,
    class_stats,
    from_params,
    pool,
    sample_virtual,
    to_params,
)


def blobs(n: int, seed: int, classes: list[int], dim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=gen)]
    z = 5 * torch.nn.functional.one_hot(y, dim).float() + torch.randn(n, dim, generator=gen)
    return z, y


def test_pooled_statistics_equal_those_of_the_union() -> None:
    (z1, y1), (z2, y2) = blobs(300, 1, [0, 1]), blobs(200, 2, [1, 2])
    pooled = pool([class_stats(z1, y1, 4), class_stats(z2, y2, 4)])
    union = class_stats(torch.cat([z1, z2]), torch.cat([y1, y2]), 4)
    torch.testing.assert_close(pooled.count, union.count)
    torch.testing.assert_close(pooled.mean, union.mean)
    torch.testing.assert_close(pooled.cov, union.cov)
    assert pooled.present.tolist() == [True, True, True, False]


def test_upload_round_trip_full_and_diagonal() -> None:
    stats = class_stats(*blobs(300, 3, [0, 1, 2]), 4)
    full = from_params(to_params(stats, diagonal=False), 4)
    torch.testing.assert_close(full.cov, stats.cov, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.mean, stats.mean, atol=1e-6, rtol=1e-6)
    diag = to_params(stats, diagonal=True)
    assert diag["cov"].shape == (4, 4)  # 4 classes x 4 dims, not 4 x 10
    torch.testing.assert_close(torch.diagonal(from_params(diag, 4).cov, dim1=1, dim2=2),
                               torch.diagonal(stats.cov, dim1=1, dim2=2), atol=1e-6, rtol=1e-6)


def test_virtual_latents_are_seeded_and_follow_the_class_statistics() -> None:
    stats = class_stats(*blobs(2000, 4, [0, 1, 2]), 4)
    per_class = torch.tensor([0, 3000, 3000, 50])  # class 3 has no statistics: nothing drawn
    z, y = sample_virtual(stats, per_class, seed=7)
    assert torch.equal(z, sample_virtual(stats, per_class, seed=7)[0])
    assert not torch.equal(z, sample_virtual(stats, per_class, seed=8)[0])
    assert torch.bincount(y, minlength=4).tolist() == [0, 3000, 3000, 0]
    for c in (1, 2):
        torch.testing.assert_close(z[y == c].mean(0).double(), stats.mean[c], atol=0.08, rtol=0)
        torch.testing.assert_close(torch.cov(z[y == c].T).double(), stats.cov[c], atol=0.1, rtol=0)


def test_mahalanobis_scores_unseen_classes_higher() -> None:
    z, y = blobs(500, 5, [0, 1])
    maha = Mahalanobis.fit(class_stats(z, y, 4), min_count=10)
    seen, _ = blobs(200, 6, [0, 1])
    unseen, _ = blobs(200, 7, [2, 3])
    assert maha.score(unseen).min() > maha.score(seen).median()
