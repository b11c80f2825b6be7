"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch

from kvstore.spec import KVSpec


@pytest.fixture
def small_spec() -> KVSpec:
    """2 layers, 2 KV heads, head_dim 8, blocks of 4 tokens: small enough to fill tiers quickly."""
    return KVSpec(num_layers=2, num_kv_heads=2, num_q_heads=4, head_dim=8, dtype=torch.float32, block_size=4)


@pytest.fixture(params=["immediate", "late"])
def copy_streams(request, monkeypatch):
    """Run a test twice: with the CPU's immediate copies, and with every KVStore's copies on a
    tests/late_stream.py LateStream (a copy lands only when waited for; until then its
    destination is NaN), which turns any copy-ordering bug into a wrong value."""
    if request.param == "late":
        import kvstore.store
        from kvstore.transfer import BlockMover
        from late_stream import LateStream

        monkeypatch.setattr(kvstore.store, "BlockMover", lambda device, **kw: BlockMover(device, stream=LateStream(), **kw))
    return request.param


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on 127.0.0.1 (tests/redis_server.py), stopped after the test."""
    from redis_server import RedisServer, require_redis

    server = RedisServer(require_redis(), tmp_path).start()
    yield server
    server.stop()
