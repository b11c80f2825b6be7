import math

import pytest
import torch

from kvstore.errors import ConfigError, IndexStateError, NonFiniteError, ShapeError
from kvstore.pq import metrics
from kvstore.pq.index import PQIndex
from kvstore.pq.select import SelectionConfig, resolve_budget, select_tokens, window_selection


@pytest.fixture(scope="module")
def indexes(small_layer):
    cfg, data = small_layer
    out = []
    for n in (2048, 1500, 700):
        index = PQIndex(cfg.head_dim, 4, 6)
        index.train(data.keys[:, :n])
        index.add(data.keys[:, :n])
        out.append(index)
    return out


def test_resolve_budget():
    assert resolve_budget(100, 1000) == 100
    assert resolve_budget(5000, 1000) == 1000
    assert resolve_budget(1 / 16, 1000) == 63
    assert resolve_budget(1.0, 7) == 7
    for bad in (0, -1, 0.0, 1.5, True, "10"):
        with pytest.raises(ConfigError):
            resolve_budget(bad, 10)


def test_selection_structure(indexes, small_layer):
    cfg, data = small_layer
    sc = SelectionConfig(num_sinks=8, recent_window=32)
    sel = select_tokens(indexes[:1], [data.queries[0]], 200, config=sc, block_size=16)[0]
    pos = sel.positions
    assert pos.shape == (cfg.num_kv_heads, 200) and sel.num_tokens == 2048
    assert bool((pos[:, 1:] > pos[:, :-1]).all())  # sorted, distinct
    assert bool(torch.isin(torch.arange(8), pos).all()) and bool(torch.isin(torch.arange(2016, 2048), pos).all())
    assert torch.equal(sel.blocks, torch.unique(pos // 16))


def test_batch_of_different_lengths_equals_one_by_one(indexes, small_layer):
    _, data = small_layer
    qs = [data.queries[i] for i in range(3)]
    budgets = [0.1, 150, 64]
    batched = select_tokens(indexes, qs, budgets)
    for index, q, b, sel in zip(indexes, qs, budgets, batched):
        alone = select_tokens([index], [q], b)[0]
        assert torch.equal(alone.positions, sel.positions)
        assert alone.num_tokens == index.ntotal


def test_group_aggregation_max_and_sum_differ_but_both_valid(indexes, small_layer):
    _, data = small_layer
    q = data.queries[1]
    s = select_tokens(indexes[:1], [q], 128, config=SelectionConfig(aggregate="sum"))[0]
    m = select_tokens(indexes[:1], [q], 128, config=SelectionConfig(aggregate="max"))[0]
    assert s.positions.shape == m.positions.shape
    # with exact-ish scores both capture most attention mass on this workload
    for sel in (s, m):
        assert metrics.attention_mass(sel.positions, q, data.keys[:, :2048], 1 / math.sqrt(64)) > 0.5


def test_pq_selection_beats_window_only(indexes, small_layer):
    cfg, data = small_layer
    keys = data.keys[:, :2048]
    scale = 1 / math.sqrt(cfg.head_dim)
    pq, win = [], []
    sc = SelectionConfig(num_sinks=8, recent_window=32)
    for s in range(cfg.num_decode):
        q = data.queries[s]
        pq.append(metrics.attention_mass(select_tokens(indexes[:1], [q], 128, config=sc)[0].positions, q, keys, scale))
        win.append(metrics.attention_mass(window_selection(2, 2048, 128, config=sc, block_size=16).positions, q, keys, scale))
    assert sum(pq) / len(pq) > sum(win) / len(win) + 0.2


def test_budget_covering_everything_selects_all(indexes, small_layer):
    _, data = small_layer
    sel = select_tokens(indexes[2:], [data.queries[0]], 1.0)[0]
    assert torch.equal(sel.positions, torch.arange(700).expand(2, -1))


def test_errors(indexes, small_layer):
    _, data = small_layer
    q = data.queries[0]
    with pytest.raises(ShapeError):
        select_tokens(indexes[:1], [q[:, :32]], 10)
    with pytest.raises(ShapeError):
        select_tokens(indexes[:1], [q[:3]], 10)
    with pytest.raises(NonFiniteError):
        select_tokens(indexes[:1], [torch.full_like(q, float("nan"))], 10)
    with pytest.raises(IndexStateError):
        select_tokens([PQIndex(64, 4, 6)], [q], 10)
    with pytest.raises(ConfigError):
        SelectionConfig(aggregate="mean")
    with pytest.raises(ShapeError):
        select_tokens(indexes[:2], [q], 10)
