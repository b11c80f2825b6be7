"""Two connectors (two engines' scheduler and worker sides) sharing one real redis-server:
what engine A saves is written through to the server, and engine B, with an empty host tier
and different GPU memory, is served A's prefix from it, bit-exact. When the server dies or a
value is damaged between B's lookup and its load, the blocks are reported as load errors
(vLLM recomputes them) and B's KV cache never receives wrong values."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lmcache")
pytest.importorskip("vllm")

from test_vllm_connector import Engine, _tokens  # noqa: E402

PROMPT = _tokens(70, 31)  # 4 full blocks of 16; the 5th is partial


def _extra(url: str) -> dict:
    return {"host_blocks": 64, "policy": "lru", "cold_tier": {"remote_url": url, "timeout_s": 0.5, "retry_interval_s": 0.2,
                                                             "staging_mib": 8}}


def _engine_a(base, hasher, url):
    a = Engine(base, hasher, _extra(url))
    a.add("a", PROMPT, max_tokens=1)
    (out, _, _), _ = a.run(2)
    a.worker.worker.cold.flush()
    return a, out.scheduled_new_reqs[0].block_ids[0][:4]


def _engine_b(base, hasher, url):
    b = Engine(base, hasher, _extra(url))
    for t in b.caches.values():  # B's GPU memory holds other values than A's
        t.normal_(generator=torch.Generator().manual_seed(5))
    b.add("b", PROMPT + [1])
    return b


def _pages(eng, blocks):
    return [{n: eng.caches[n][blk].clone() for n in eng.caches} for blk in blocks]


def test_engine_b_is_served_engine_a_prefix(base_vllm_config, block_hasher, redis_server):
    a, a_blocks = _engine_a(base_vllm_config, block_hasher, redis_server.url)
    assert a.worker.worker.cold.stats.puts == 4  # written through at save time, not on eviction
    b = _engine_b(base_vllm_config, block_hasher, redis_server.url)
    out, meta, kvo = b.step()
    assert len(meta.fetches) == 4 and len(meta.loads["b"]) == 4 and not kvo.invalid_block_ids
    assert out.scheduled_new_reqs[0].num_computed_tokens == 64
    for want, dst in zip(_pages(a, a_blocks), meta.loads["b"].gpu_blocks.tolist()):
        for n in b.caches:
            assert torch.equal(b.caches[n][dst], want[n])


@pytest.mark.parametrize("fault", ["killed", "damaged"])
def test_fault_between_lookup_and_load_is_a_load_error(base_vllm_config, block_hasher, redis_server, fault):
    a, _ = _engine_a(base_vllm_config, block_hasher, redis_server.url)
    b = _engine_b(base_vllm_config, block_hasher, redis_server.url)
    before = {n: t.clone() for n, t in b.caches.items()}
    worker = b.worker
    start = worker.start_load_kv

    def fault_then_start(*args, **kwargs):  # after the scheduler's lookup, before the worker's reads
        if fault == "killed":
            redis_server.kill()
        else:
            r = redis_server.client()
            for k in r.keys("*kv_bytes"):
                v = bytearray(r.get(k))
                v[-1] ^= 0xFF
                r.set(k, bytes(v))
        return start(*args, **kwargs)

    worker.start_load_kv = fault_then_start
    out, meta, kvo = b.step()
    loaded = meta.loads["b"].gpu_blocks.tolist()
    assert len(meta.fetches) == 4 and set(loaded) == kvo.invalid_block_ids  # vLLM recomputes them
    for n, t in b.caches.items():  # no load wrote into B's cache
        assert torch.equal(t, before[n])
    cold = worker.worker.cold
    assert (cold.stats.outages, cold.stats.corrupt) == ((1, 0) if fault == "killed" else (0, 4))


def test_server_down_from_the_start_is_a_plain_miss(base_vllm_config, block_hasher, tmp_path):
    from redis_server import RedisServer, require_redis

    server = RedisServer(require_redis(), tmp_path)  # never started
    b = _engine_b(base_vllm_config, block_hasher, server.url)
    out, meta, kvo = b.step()
    assert not meta.fetches and "b" not in meta.loads and not kvo.invalid_block_ids
    assert out.scheduled_new_reqs[0].num_computed_tokens == 0
