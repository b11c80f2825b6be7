import math

import pytest
import torch

from kvstore.errors import ConfigError, ShapeError
from kvstore.pq import metrics
from kvstore.pq.synthetic import SyntheticConfig, SyntheticWorkload


def test_full_selection_is_perfect(small_layer):
    cfg, data = small_layer
    keys, values = data.keys[:, :2048], data.values[:, :2048]
    everything = torch.arange(2048).expand(cfg.num_kv_heads, -1)
    q = data.queries[0]
    quality = metrics.evaluate(everything, q, keys, values, k=100, scale=cfg.softmax_scale)
    assert quality.recall == 1.0
    assert quality.mass == pytest.approx(1.0, abs=1e-5)
    assert quality.output_error < 1e-5


def test_metrics_against_hand_computed():
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]])  # one KV head, 3 tokens
    values = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    q = torch.tensor([[1.0, 0.0]])
    sel = torch.tensor([[2]])
    probs = torch.softmax(torch.tensor([1.0, 0.0, 2.0]), 0)
    assert metrics.recall_at_k(sel, q, keys, 1) == 1.0
    assert metrics.recall_at_k(sel, q, keys, 2) == 0.5
    assert metrics.attention_mass(sel, q, keys, 1.0) == pytest.approx(float(probs[2]))
    full = probs @ values[0]
    expected = float((torch.tensor([1.0, 1.0]) - full).norm() / full.norm())
    assert metrics.output_error(sel, q, keys, values, 1.0) == pytest.approx(expected, rel=1e-5)
    assert metrics.needle_hits(sel, torch.tensor([2, 0])) == 0.5
    with pytest.raises(ShapeError):
        metrics.recall_at_k(sel, torch.ones(1, 3), keys, 1)


def test_workload_is_seeded_and_shaped(small_layer):
    cfg, data = small_layer
    again = SyntheticWorkload(cfg).layer(0)
    assert torch.equal(again.keys, data.keys) and torch.equal(again.queries, data.queries)
    assert not torch.equal(SyntheticWorkload(cfg).layer(1).keys, data.keys)
    assert data.keys.shape == (2, 2056, 64) and data.queries.shape == (8, 4, 64)
    assert bool(data.keys.abs().sum(-1).gt(0).all())


def test_workload_has_sinks_needles_and_outliers(small_layer):
    cfg, data = small_layer
    keys = data.keys[:, : cfg.prompt_len]
    for i, step in enumerate(data.needle_steps.tolist()):
        q = data.queries[step].view(cfg.num_kv_heads, cfg.group_size, -1)
        logits = torch.matmul(q, keys.transpose(1, 2)) * cfg.softmax_scale  # [Hkv, G, N]
        top = logits.topk(cfg.prompt_len // 16, -1).indices  # within a 1/16 budget for every query head
        assert bool((top == data.needle_positions[i]).any(-1).all())
    q = data.queries.view(-1, cfg.num_kv_heads, cfg.group_size, cfg.head_dim)
    probs = torch.softmax(torch.matmul(q, keys.transpose(1, 2).unsqueeze(0)) * cfg.softmax_scale, -1)
    assert float(probs[..., : cfg.num_sinks].sum(-1).mean()) > 0.05  # sinks draw attention (on average over the steps)
    assert float(data.keys.abs().amax(-1).mean()) > 4 * float(data.keys.abs().mean())  # outlier channels


def test_bad_workload_config():
    with pytest.raises(ConfigError):
        SyntheticConfig(head_dim=63)
    with pytest.raises(ConfigError):
        SyntheticConfig(num_needles=9, num_decode=4)
    with pytest.raises(ConfigError):
        SyntheticConfig(prompt_len=100, num_decode=4, drift_at=500)
