import math

import pytest
import torch

from kvstore.errors import ConfigError, IndexStateError, NonFiniteError, ShapeError
from kvstore.pq import metrics
from kvstore.pq.index import PQIndex
from kvstore.pq.select import SelectionConfig, resolve_budget, select_exact, select_tokens, window_selection


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
        assert alone.positions.shape == sel.positions.shape and alone.num_tokens == index.ntotal
        # The same tokens, up to ties: tokens with equal codes score alike, and top-k may take
        # either of two tied tokens in a padded batch and alone.
        for h in range(index.num_heads):
            codes = lambda pos: sorted(map(tuple, index.codes[h, pos].tolist()))  # noqa: E731
            assert codes(alone.positions[h]) == codes(sel.positions[h])
        assert (alone.positions != sel.positions).float().mean() < 0.01


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


def _exact_selection(data, n, q, budget, sc):
    """Sinks + window + the top-k by exact scores, aggregated as select_tokens does."""
    H, D = data.keys.shape[0], data.keys.shape[2]
    logits = torch.matmul(q.view(H, -1, D), data.keys[:, :n].transpose(1, 2)) / math.sqrt(D)
    probs = torch.softmax(logits[..., sc.num_sinks : n - sc.recent_window], -1).sum(1)
    top = probs.topk(budget - sc.num_sinks - sc.recent_window, -1).indices + sc.num_sinks
    fixed = torch.cat([torch.arange(sc.num_sinks), torch.arange(n - sc.recent_window, n)]).expand(H, -1)
    return torch.cat([fixed, top], 1).sort(1).values


def test_refine_with_a_shortlist_of_everything_is_exact_selection(indexes, small_layer):
    cfg, data = small_layer
    sc = SelectionConfig(num_sinks=8, recent_window=32, refine=100.0)  # shortlist = every candidate
    for step in range(3):
        q = data.queries[step]
        got = select_tokens(indexes[:1], [q], 128, config=sc, keys=[data.keys[:, :2048]])[0].positions
        want = _exact_selection(data, 2048, q, 128, sc)
        assert torch.equal(got, want)
        assert torch.equal(select_exact(data.keys[:, :2048], q, 128, config=sc).positions, want)  # the bench's oracle


def test_refine_finds_the_needles_and_beats_codes_only(indexes, small_layer):
    cfg, data = small_layer
    keys = data.keys[:, :2048]
    plain, refined = SelectionConfig(num_sinks=8, recent_window=32), SelectionConfig(num_sinks=8, recent_window=32, refine=2.0)
    gather = lambda pos: keys.gather(1, pos.clamp_min(0)[..., None].expand(-1, -1, cfg.head_dim))  # noqa: E731  (the callable form; -1 = not a candidate)
    mass = {"plain": 0.0, "refined": 0.0}
    for step, pos in zip(data.needle_steps.tolist(), data.needle_positions.tolist()):
        q = data.queries[step]
        a = select_tokens(indexes[:1], [q], 128, config=plain)[0].positions
        b = select_tokens(indexes[:1], [q], 128, config=refined, keys=[gather])[0].positions
        assert bool((b == pos).any(1).all())  # every KV head keeps the needle
        mass["plain"] += metrics.attention_mass(a, q, keys, cfg.softmax_scale)
        mass["refined"] += metrics.attention_mass(b, q, keys, cfg.softmax_scale)
    assert mass["refined"] > mass["plain"]


def test_refine_needs_keys_of_the_right_shape(indexes, small_layer):
    cfg, data = small_layer
    sc = SelectionConfig(refine=2.0)
    with pytest.raises(ConfigError, match="refine"):
        select_tokens(indexes[:1], [data.queries[0]], 128, config=sc)
    with pytest.raises(ShapeError, match="keys"):
        select_tokens(indexes[:1], [data.queries[0]], 300, config=sc, keys=[data.keys[:, :100]])
    for bad in (0.5, float("inf"), True, "2"):
        with pytest.raises(ConfigError, match="refine"):
            SelectionConfig(refine=bad)
