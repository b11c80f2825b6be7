"""Shared fixtures."""

from __future__ import annotations

import os

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


@pytest.fixture
def nvrtc():
    """cupy's NVRTC bindings with the library loaded (the `test` extra installs it: compiling
    csrc/ needs no GPU). Missing, the test is skipped, or fails where ``KVSTORE_REQUIRE_NVRTC=1``
    (``.ci/run`` sets it: the kernels' compile checks must run there)."""
    try:
        from cupy_backends.cuda.libs import nvrtc as lib

        lib.getVersion()  # loads libnvrtc, or raises
    except Exception as exc:  # ImportError, or the library not found
        msg = f"NVRTC unavailable ({type(exc).__name__}: {exc}); `pip install -e '.[test]'` installs it"
        if os.environ.get("KVSTORE_REQUIRE_NVRTC") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return lib
