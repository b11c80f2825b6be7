"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch

from kvstore.spec import KVSpec


@pytest.fixture
def small_spec() -> KVSpec:
    """2 layers, 2 KV heads, head_dim 8, blocks of 4 tokens: small enough to fill tiers quickly."""
    return KVSpec(num_layers=2, num_kv_heads=2, num_q_heads=4, head_dim=8, dtype=torch.float32, block_size=4)
