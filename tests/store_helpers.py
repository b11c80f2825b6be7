"""Helpers shared by the store tests."""

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
