import pytest
import torch

from kvstore.errors import ConfigError, IndexStateError, NonFiniteError, OutOfRangeError, ShapeError
from kvstore.pq.adc import adc_scores, adc_topk, lookup_tables
from kvstore.pq.index import PQIndex


@pytest.fixture()
def trained(clustered):
    keys = clustered(3, 1200, 32, clusters=24)
    index = PQIndex(32, 4, 6)
    index.train(keys)
    index.add(keys)
    return index, keys


def _snapshot(index):
    return (index.ntotal, None if index.centroids is None else index.centroids.clone(),
            None if index._codes is None else index.codes.clone())


def _same(a, b):
    return a[0] == b[0] and all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a[1:], b[1:]))


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_codes_are_uint8_in_range_and_sized(bits, clustered):
    keys = clustered(2, 600, 16)
    index = PQIndex(16, 4, bits)
    index.train(keys)
    index.add(keys)
    assert index.codes.dtype == torch.uint8 and index.codes.shape == (2, 600, 4)
    assert int(index.codes.max()) < 2**bits
    assert index.code_bytes_per_token == 4


def test_centroid_vectors_round_trip_exactly(trained):
    index, _ = trained
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(index.num_centroids, (3, 50, 4), generator=g).to(torch.uint8)
    vectors = index.decode(codes)  # keys equal to centroid concatenations
    assert torch.equal(index.encode(vectors), codes)
    assert torch.equal(index.decode(index.encode(vectors)), vectors)


def test_incremental_add_equals_bulk_add(trained, clustered):
    index, keys = trained
    other = PQIndex(32, 4, 6)
    other.load_state_dict({**index.state_dict(), "codes": index.codes[:, :0].clone(), "outliers": index.outliers[:, :0].clone()})
    for start in range(0, keys.shape[1], 257):  # crosses the buffer growth
        other.add(keys[:, start : start + 257])
    assert other.ntotal == index.ntotal
    assert torch.equal(other.codes, index.codes)
    assert torch.equal(other.outliers, index.outliers)


def test_scores_equal_inner_products_with_reconstructions(trained):
    index, keys = trained
    q = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1))
    expected = torch.matmul(q, index.decode(index.codes).transpose(1, 2))
    torch.testing.assert_close(index.scores(q), expected, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("n,bits", [(40, 4), (5000, 4), (300, 8)])
def test_adc_paths_match_gather_reference(n, bits):
    g = torch.Generator().manual_seed(n)
    K = 2**bits
    codes = torch.randint(K, (2, n, 4), generator=g).to(torch.uint8)
    tables = torch.randn(2, 3, 4, K, generator=g)
    ref = torch.gather(tables.unsqueeze(2).expand(2, 3, n, 4, K), 4, codes.long().unsqueeze(1).unsqueeze(-1).expand(2, 3, n, 4, 1))
    torch.testing.assert_close(adc_scores(codes, tables), ref.squeeze(-1).sum(-1), atol=1e-5, rtol=1e-5)


def test_search_matches_brute_force_adc_and_recalls_exact(trained):
    index, keys = trained
    q = keys[:, :4] + 0.01  # queries near stored keys
    got = index.search(q, 20)
    assert got.shape == (3, 4, 20) and got.dtype == torch.int64
    adc = index.scores(q)
    torch.testing.assert_close(adc.gather(2, got), adc.topk(20, -1).values)
    # recall 10@100 against exact maximum inner product (FAISS-style R@k)
    exact = torch.matmul(q, keys.transpose(1, 2)).topk(10, -1).indices
    wide = index.search(q, 100)
    recall = (exact.unsqueeze(-1) == wide.unsqueeze(-2)).any(-1).float().mean()
    assert recall >= 0.95


def test_adc_topk_bounds_and_aggregate():
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(16, (2, 100, 2), generator=g).to(torch.uint8)
    tables = torch.randn(2, 3, 2, 16, generator=g)
    lo, hi = torch.tensor([10, 0]), torch.tensor([60, 100])
    for agg in ("sum", "max"):
        top = adc_topk(codes, tables, 5, lo=lo, hi=hi, aggregate=agg, scale=0.5)
        assert top.shape == (2, 5)
        assert bool(((top[0] >= 10) & (top[0] < 60)).all())
        probs = torch.softmax(adc_scores(codes, tables)[0, :, 10:60] * 0.5, -1)
        red = probs.sum(0) if agg == "sum" else probs.amax(0)
        assert set(top[0].tolist()) == set((red.topk(5).indices + 10).tolist())


def test_state_dict_round_trip(trained):
    index, keys = trained
    clone = PQIndex(32, 4, 6)
    clone.load_state_dict(index.state_dict())
    q = torch.randn(3, 2, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(clone.search(q, 7), index.search(q, 7))
    with pytest.raises(ConfigError):
        PQIndex(32, 4, 8).load_state_dict(index.state_dict())


def test_reset_keeps_training(trained):
    index, keys = trained
    index.reset()
    assert index.ntotal == 0 and index.is_trained
    index.add(keys[:, :10])
    assert index.ntotal == 10


@pytest.mark.parametrize("kwargs", [dict(head_dim=30, num_subspaces=4), dict(head_dim=32, bits=3), dict(head_dim=32, bits=9), dict(head_dim=0)])
def test_bad_construction(kwargs):
    with pytest.raises(ConfigError):
        PQIndex(**kwargs)


def test_use_before_train_is_typed():
    index = PQIndex(16, 4, 4)
    with pytest.raises(IndexStateError):
        index.search(torch.randn(1, 1, 16), 1)
    with pytest.raises(IndexStateError):
        index.add(torch.randn(1, 20, 16))
    assert not index.is_trained and index.ntotal == 0


def test_bad_inputs_leave_state_unchanged(trained):
    index, keys = trained
    before = _snapshot(index)
    nan = keys[:, :5].clone()
    nan[1, 2, 3] = float("nan")
    cases = [
        (NonFiniteError, lambda: index.add(nan)),
        (ShapeError, lambda: index.add(keys[:2, :5])),  # heads
        (ShapeError, lambda: index.add(torch.randn(3, 5, 16))),  # head_dim
        (ShapeError, lambda: index.add(keys[0])),  # rank
        (ShapeError, lambda: index.search(torch.randn(2, 1, 32), 3)),
        (OutOfRangeError, lambda: index.search(torch.randn(3, 1, 32), index.ntotal + 1)),
        (OutOfRangeError, lambda: index.search(torch.randn(3, 1, 32), 0)),
        (NonFiniteError, lambda: index.train(nan)),
        (ShapeError, lambda: index.train(keys[:, :10])),  # fewer keys than centroids
    ]
    for error, call in cases:
        with pytest.raises(error):
            call()
        assert _same(_snapshot(index), before)


def test_outliers_are_the_keys_no_centroid_fits(clustered):
    keys = clustered(2, 3000, 32, seed=5)
    index = PQIndex(32, 4, 6, outlier_fraction=0.01)
    index.train(keys)
    index.add(keys)
    planted = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(9)) * 3 * keys.std()  # random directions
    err = index.add(planted)
    found = index.outliers
    assert found.dtype == torch.int64 and found.shape[0] == 2
    for h in range(2):
        row = found[h][found[h] >= 0]
        assert bool((row[1:] > row[:-1]).all())  # ascending, distinct
        assert set(range(3000, 3003)) <= set(row.tolist())  # the planted keys
        assert row.numel() < 0.05 * index.ntotal  # about outlier_fraction of the rest
    assert bool((err > index.outlier_threshold[:, None]).all())
    index.reset()
    assert index.outliers.shape[1] == 0 and index.ntotal == 0


@pytest.mark.parametrize("bad", [-0.1, 1.0, True, "0.01"])
def test_bad_outlier_fraction(bad):
    with pytest.raises(ConfigError, match="outlier_fraction"):
        PQIndex(32, 4, 6, outlier_fraction=bad)


def test_state_dict_rejects_outliers_beyond_the_codes(trained):
    index, _ = trained
    state = index.state_dict()
    other = PQIndex(32, 4, 6)
    bad = torch.full((state["codes"].shape[0], 1), state["codes"].shape[1], dtype=torch.int64)
    with pytest.raises(ShapeError, match="outliers"):
        other.load_state_dict({**state, "outliers": bad})
    assert not other.is_trained  # unchanged
