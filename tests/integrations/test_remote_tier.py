"""The remote cold tier against a real redis-server (tests/redis_server.py): bit-exact round
trips, sharing between tiers and processes, and the faults: server down at start, killed
mid-run, hung (a timeout), and damaged, truncated, foreign or misplaced values. In every
fault a read says False (the caller's load error: vLLM recomputes), never returns wrong KV,
never waits past its timeout, and the tier recovers when the server is back."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
import torch

pytest.importorskip("lmcache")

from kvstore.errors import ConfigError, ShapeError  # noqa: E402
from kvstore.integrations.lmcache import ColdTierConfig, LMCacheRemoteTier, open_cold_tier  # noqa: E402
from kvstore.integrations.lmcache.codec import BlockCodec, CorruptBlockError  # noqa: E402
from kvstore.spec import KVSpec  # noqa: E402

SPEC = KVSpec.preset("tiny", block_size=16)
TIMEOUT = 0.5
RETRY = 0.3


def _blocks(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *SPEC.block_shape), generator=g) + 0.25


def _tier(url: str, model: str = "tiny-llama", **kw) -> LMCacheRemoteTier:
    kw.setdefault("staging_mib", 8.0)
    cfg = ColdTierConfig(remote_url=url, timeout_s=TIMEOUT, retry_interval_s=RETRY, **kw)
    return LMCacheRemoteTier(cfg, SPEC, model_name=model)


@pytest.fixture
def tier(redis_server):
    t = _tier(redis_server.url)
    yield t
    t.close()


def _sentinel() -> torch.Tensor:
    return torch.full(SPEC.block_shape, 7.0)


def _value_keys(server) -> list[bytes]:
    return sorted(k for k in server.client().keys("*") if k.endswith(b"kv_bytes"))


def test_round_trip_bit_exact_and_leading_count(tier):
    blocks = _blocks(5)
    assert all(tier.put(100 + i, blocks[i]) for i in range(5))
    tier.flush()
    assert tier.count_leading([100, 101, 102, 999, 103]) == 3
    outs = [_sentinel() for _ in range(6)]
    got = tier.get_many([104, 103, 102, 101, 100, 999], outs)
    assert got == [True] * 5 + [False]
    for i in range(5):
        assert torch.equal(outs[i], blocks[4 - i])
    assert torch.equal(outs[5], _sentinel())  # a miss leaves its output untouched
    assert tier.stats.hits == 5 and tier.stats.misses == 1 and tier.stats.corrupt == 0


def test_bfloat16_blocks_round_trip(redis_server):
    spec = KVSpec(num_layers=2, num_kv_heads=2, num_q_heads=4, head_dim=8, dtype=torch.bfloat16, block_size=4)
    t = LMCacheRemoteTier(ColdTierConfig(remote_url=redis_server.url, timeout_s=TIMEOUT), spec, model_name="m")
    try:
        block = (torch.randn(spec.block_shape, generator=torch.Generator().manual_seed(3)) + 1).to(torch.bfloat16)
        assert t.put(5, block)
        t.flush()
        out = torch.zeros(spec.block_shape, dtype=torch.bfloat16)
        assert t.get(5, out) and torch.equal(out, block)
    finally:
        t.close()


def test_two_tiers_share_and_namespaces_do_not(redis_server, tier):
    blocks = _blocks(3)
    for i in range(3):
        tier.put(i + 1, blocks[i])
    tier.flush()
    other = _tier(redis_server.url)
    foreign = _tier(redis_server.url, model="another-model")
    try:
        out = _sentinel()
        assert other.count_leading([1, 2, 3]) == 3 and other.get(2, out) and torch.equal(out, blocks[1])
        assert foreign.count_leading([1, 2, 3]) == 0 and not foreign.get(2, out)
    finally:
        other.close()
        foreign.close()


def test_a_block_written_by_another_process_is_read_here(redis_server, tier):
    script = textwrap.dedent(f"""
        import torch
        from kvstore.integrations.lmcache import ColdTierConfig, LMCacheRemoteTier
        from kvstore.spec import KVSpec
        spec = KVSpec.preset("tiny", block_size=16)
        t = LMCacheRemoteTier(ColdTierConfig(remote_url={redis_server.url!r}), spec, model_name="tiny-llama")
        g = torch.Generator().manual_seed(11)
        assert t.put(2**255 + 17, torch.randn(spec.block_shape, generator=g) + 0.25)
        t.close()
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, capture_output=True)
    want = torch.randn(SPEC.block_shape, generator=torch.Generator().manual_seed(11)) + 0.25
    out = _sentinel()
    assert tier.count_leading([2**255 + 17]) == 1 and tier.get(2**255 + 17, out)
    assert torch.equal(out, want)


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "foreign_metadata", "moved"])
def test_damaged_values_are_load_errors_not_wrong_kv(tier, redis_server, damage):
    blocks = _blocks(2)
    tier.put(1, blocks[0])
    tier.put(2, blocks[1])
    tier.flush()
    r = redis_server.client()
    keys = {k: r.get(k) for k in r.keys("*")}
    kv1 = next(k for k in keys if k.endswith(b"kv_bytes") and b"@1@float" in k)
    meta1 = kv1.replace(b"kv_bytes", b"metadata")
    kv2 = next(k for k in keys if k.endswith(b"kv_bytes") and b"@2@float" in k)
    value = bytearray(keys[kv1])
    if damage == "flip":
        value[len(value) // 2] ^= 0x10
        r.set(kv1, bytes(value))
    elif damage == "truncate":
        r.set(kv1, bytes(value[: len(value) // 3]))
    elif damage == "empty":
        r.set(kv1, b"")
    elif damage == "foreign_metadata":  # metadata of a value far larger than any staging buffer
        from lmcache.v1.memory_management import MemoryFormat
        from lmcache.v1.protocol import RemoteMetadata

        r.set(meta1, RemoteMetadata(2**30, [torch.Size([2**30])], [torch.uint8], MemoryFormat.KV_2LTD).serialize())
    elif damage == "moved":  # block 2's intact value stored under block 1's key
        r.set(kv1, keys[kv2])
    out = _sentinel()
    t0 = time.monotonic()
    assert tier.get(1, out) is False
    assert time.monotonic() - t0 < 3 * TIMEOUT + 1.0
    assert torch.equal(out, _sentinel())
    assert tier.stats.corrupt == 1 and tier.stats.outages == 0
    assert tier.get(2, out) and torch.equal(out, blocks[1])  # the rest is served as before
    assert tier.put(1, blocks[0])  # a damaged value is rewritten by the next write of the block ...
    tier.flush()
    assert tier.get(1, out) and torch.equal(out, blocks[0])  # ... and read again


def test_codec_names_what_disagrees():
    codec = BlockCodec(SPEC, "m")
    buf = torch.empty(codec.nbytes, dtype=torch.uint8)
    block = _blocks(1)[0]
    codec.encode(9, block, buf)
    out = torch.empty(SPEC.block_shape)
    codec.decode(9, buf, out)
    assert torch.equal(out, block)
    with pytest.raises(CorruptBlockError, match="holds block 0x9"):
        codec.decode(10, buf, out)
    with pytest.raises(CorruptBlockError, match="another model or layout"):
        BlockCodec(SPEC, "other").decode(9, buf, out)
    with pytest.raises(CorruptBlockError, match="elements"):
        codec.decode(9, buf[:-1], out)
    buf[-1] ^= 1
    with pytest.raises(CorruptBlockError, match="checksum"):
        codec.decode(9, buf, out)


def test_server_down_at_start_then_recovers(tmp_path):
    from redis_server import RedisServer, require_redis

    server = RedisServer(require_redis(), tmp_path)  # not started: connections are refused
    t = _tier(server.url)
    try:
        block, out = _blocks(1)[0], _sentinel()
        t0 = time.monotonic()
        assert t.count_leading([1]) == 0
        assert not t.put(1, block) and not t.get(1, out)
        assert time.monotonic() - t0 < 2 * TIMEOUT + 1.0
        assert t.stats.outages == 1 and t.stats.dropped_puts == 1 and not t.available
        server.start()
        time.sleep(RETRY + 0.05)
        assert t.available and t.put(1, block)
        t.flush()
        assert t.count_leading([1]) == 1 and t.get(1, out) and torch.equal(out, block)
    finally:
        t.close()
        server.stop()


def test_server_killed_mid_run_then_restarted(tier, redis_server):
    blocks = _blocks(3)
    tier.put(1, blocks[0])
    tier.flush()
    redis_server.kill()
    out = _sentinel()
    t0 = time.monotonic()
    assert tier.get(1, out) is False and torch.equal(out, _sentinel())
    assert tier.count_leading([1]) == 0  # marked down: no second wait
    assert time.monotonic() - t0 < 2 * TIMEOUT + 1.0
    assert tier.stats.outages == 1
    redis_server.start()  # same port, empty
    time.sleep(RETRY + 0.05)
    assert tier.count_leading([1]) == 0  # the restarted server lost it: a miss, not an error
    assert tier.put(1, blocks[0]) and tier.put(2, blocks[1])  # written again (the outage forgot what was sent)
    tier.flush()
    assert tier.get_many([1, 2], [out, _sentinel()]) == [True, True] and torch.equal(out, blocks[0])


def test_hung_server_times_out_and_recovers(tier, redis_server):
    blocks = _blocks(4)
    for i in range(4):
        tier.put(i, blocks[i])
    tier.flush()
    redis_server.pause()
    try:
        outs = [_sentinel() for _ in range(4)]
        t0 = time.monotonic()
        assert tier.get_many([0, 1, 2, 3], outs) == [False] * 4  # four reads, one deadline
        elapsed = time.monotonic() - t0
        assert elapsed < 2 * TIMEOUT + 0.5, f"a step waited {elapsed:.2f} s for a hung server (timeout {TIMEOUT} s)"
        assert all(torch.equal(o, _sentinel()) for o in outs)
        assert tier.stats.timeouts >= 1 and not tier.available
        t0 = time.monotonic()
        assert tier.count_leading([0]) == 0 and not tier.put(9, blocks[0])  # down: answered at once
        assert time.monotonic() - t0 < 0.1
    finally:
        redis_server.resume()
    time.sleep(RETRY + 0.05)
    out = _sentinel()
    assert tier.get(3, out) and torch.equal(out, blocks[3])


def test_writes_beyond_the_staging_pool_are_dropped_not_queued(redis_server):
    t = _tier(redis_server.url, staging_mib=1.0)  # room for a few in-flight writes only
    redis_server.pause()
    try:
        sent = [t.put(i, b) for i, b in enumerate(_blocks(64))]
        assert sent.count(True) < 64 and t.stats.dropped_puts == sent.count(False) > 0
    finally:
        redis_server.resume()
        t.close()


def test_layered_disk_and_remote(tmp_path, redis_server):
    cfg = ColdTierConfig(path=str(tmp_path / "disk"), max_gib=0.05, remote_url=redis_server.url, timeout_s=TIMEOUT)
    t = open_cold_tier(cfg, SPEC, model_name="tiny-llama")
    try:
        blocks = _blocks(2)
        assert t.put(1, blocks[0])  # a victim: to the disk and the server
        assert t.publish(2, blocks[1])  # write-through: the server only
        t.flush()
        remote = _tier(redis_server.url)
        try:
            assert remote.count_leading([1, 2]) == 2
        finally:
            remote.close()
        assert t.tiers[0].contains(1) and not t.tiers[0].contains(2)
        outs = [_sentinel(), _sentinel()]
        assert t.get_many([1, 2], outs) == [True, True]
        assert torch.equal(outs[0], blocks[0]) and torch.equal(outs[1], blocks[1])
    finally:
        t.close()


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"remote_url": "http://127.0.0.1:6379"}, "scheme 'http'"),
        ({"remote_url": "redis://:6379"}, "names no host"),
        ({"remote_url": "redis://127.0.0.1:99999"}, "not a valid URL"),
        ({"remote_url": 6379}, "URL string"),
        ({"remote_url": "redis://h:1", "timeout_s": 0}, "timeout_s 0"),
        ({"remote_url": "redis://h:1", "timeout_s": float("nan")}, "timeout_s nan"),
        ({"remote_url": "redis://h:1", "write_through": "yes"}, "write_through"),
        ({"path": "/tmp/x", "max_gib": float("inf")}, "max_gib inf"),
        ({}, "path .* remote_url"),
        ({"remote_url": "redis://h:1", "host": "h"}, "unknown cold_tier key"),
    ],
)
def test_bad_config_is_a_config_error_naming_it(raw, match):
    with pytest.raises(ConfigError, match=match):
        ColdTierConfig.from_dict(raw)


def test_bad_block_is_a_shape_error(tier):
    with pytest.raises(ShapeError, match="shape"):
        tier.put(1, torch.zeros(3))
    with pytest.raises(ShapeError, match="2 keys but 1"):
        tier.get_many([1, 2], [_sentinel()])
    assert tier.stats.puts == 0 and tier.count_leading([1]) == 0
