import pytest
import torch

from kvstore.errors import ConfigError, ShapeError
from kvstore.pq.kmeans import KMeansConfig, assign, kmeans


def _error(x, c):
    return float(assign(x, c)[1].mean())


def test_deterministic_for_a_seed():
    x = torch.randn(6, 2000, 8, generator=torch.Generator().manual_seed(0))
    a = kmeans(x, 32, KMeansConfig(seed=3))
    b = kmeans(x, 32, KMeansConfig(seed=3))
    c = kmeans(x, 32, KMeansConfig(seed=4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("init", ["sample", "kmeans++"])
def test_recovers_separated_clusters(init, clustered):
    x = clustered(3, 3000, 8, clusters=8, noise=0.01)
    c = kmeans(x, 8, KMeansConfig(init=init, num_iters=10))
    # every point lies within noise of a centroid (sampled init can merge two clusters; ++ does not)
    err = assign(x, c)[1]
    if init == "kmeans++":
        assert float(err.max()) < 0.05
    assert float(err.median()) < 0.05


def test_iterations_reduce_error_and_subsample_cap():
    x = torch.randn(4, 4000, 16, generator=torch.Generator().manual_seed(1))
    one = kmeans(x, 64, KMeansConfig(num_iters=1))
    many = kmeans(x, 64, KMeansConfig(num_iters=8))
    assert _error(x, many) < _error(x, one)
    capped = kmeans(x, 64, KMeansConfig(max_points_per_centroid=4))  # trains on 256 of 4000 points
    assert capped.shape == (4, 64, 16)
    assert _error(x, capped) < 1.3 * _error(x, many)


def test_faiss_backend_matches_torch_quality():
    pytest.importorskip("faiss")
    x = torch.randn(4, 3000, 16, generator=torch.Generator().manual_seed(2))
    t = kmeans(x, 32, KMeansConfig(num_iters=10))
    f = kmeans(x, 32, KMeansConfig(backend="faiss", num_iters=10))
    assert f.shape == t.shape
    assert _error(x, f) == pytest.approx(_error(x, t), rel=0.05)


def test_assign_matches_brute_force():
    x = torch.randn(2, 500, 4, generator=torch.Generator().manual_seed(3))
    c = torch.randn(2, 7, 4, generator=torch.Generator().manual_seed(4))
    codes, sq = assign(x, c)
    d = torch.cdist(x, c).square()
    assert torch.equal(codes, d.argmin(-1))
    torch.testing.assert_close(sq, d.min(-1).values, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k", [256, 5000])
def test_assign_packed_min_matches_brute_force_up_to_near_ties(k):
    """k=256 packs the index into the distances' low mantissa bits (several cache-sized blocks,
    offset points so that ``||c||^2 - 2 x.c`` is negative); k=5000 is past the packing limit
    and takes the exact arg-reduction. Any code that differs from the float64 argmin is a
    near-tie, and the distances agree."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5000, 8, generator=g) * 2 + 3
    c = torch.randn(2, k, 8, generator=g) * 2 + 3
    codes, sq = assign(x, c)
    d = torch.cdist(x.double(), c.double()).square()
    best = d.min(-1).values
    chosen = d.gather(-1, codes.unsqueeze(-1)).squeeze(-1)
    assert (chosen - best).abs().max() <= 1e-4 * best.abs().max()
    assert (codes != d.argmin(-1)).float().mean() < 1e-3
    torch.testing.assert_close(sq.double(), best, atol=1e-3, rtol=1e-3)
    # float64 points are never packed: exact
    codes64, _ = assign(x.double(), c.double())
    assert torch.equal(codes64, d.argmin(-1))


@pytest.mark.parametrize(
    "kwargs", [dict(backend="sklearn"), dict(init="random"), dict(num_iters=0), dict(max_points_per_centroid=0), dict(backend="faiss", init="kmeans++")]
)
def test_bad_config(kwargs):
    with pytest.raises(ConfigError):
        KMeansConfig(**kwargs)


def test_too_few_points():
    with pytest.raises(ShapeError, match="at least 16 points"):
        kmeans(torch.randn(2, 10, 4), 16)
