"""Shared fixtures: small specs and seeded K/V that is never all zeros."""

from __future__ import annotations

import pytest
import torch

from kvstore.spec import KVSpec

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def random_kv(spec: KVSpec, num_tokens: int, seed: int, device="cpu") -> torch.Tensor:
    """Seeded K/V ``[num_layers, 2, num_tokens, Hkv, D]``, standard normal (never all zeros)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(spec.num_layers, 2, num_tokens, spec.num_kv_heads, spec.head_dim, generator=g)
    return x.to(dtype=spec.dtype, device=device)


@pytest.fixture
def small_spec() -> KVSpec:
    """2 layers, 2 KV heads, head_dim 8, blocks of 4 tokens: small enough to fill tiers quickly."""
    return KVSpec(num_layers=2, num_kv_heads=2, num_q_heads=4, head_dim=8, dtype=torch.float32, block_size=4)
