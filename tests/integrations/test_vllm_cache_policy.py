"""kvstore policies as vLLM CachePolicy classes, resolved and driven by vLLM's own code."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from vllm.v1.kv_offload.base import ReqContext, make_offload_key  # noqa: E402
from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager  # noqa: E402
from vllm.v1.kv_offload.cpu.policies.base import ChunkStatus  # noqa: E402
from vllm.v1.kv_offload.cpu.policies.factory import CachePolicyFactory  # noqa: E402

from kvstore.errors import ConfigError  # noqa: E402
from kvstore.integrations.vllm import KVStoreCachePolicy, cache_policy_class  # noqa: E402

MODULE = "kvstore.integrations.vllm"


def key(i: int):
    return make_offload_key(i.to_bytes(8, "big"), 0)


@pytest.mark.parametrize("name", ["kvstore_lru", "kvstore_asym", "kvstore_fifo"])
def test_factory_resolves_adapter(name):
    cls = CachePolicyFactory.get_cache_policy_cls(name, MODULE)
    assert issubclass(cls, KVStoreCachePolicy) and cls is cache_policy_class(name.split("_", 1)[1])
    manager = CPUOffloadingManager(num_chunks=4, cache_policy=name, cache_policy_module_path=MODULE)
    assert isinstance(manager._policy, cls)


def test_unknown_policy_named():
    with pytest.raises(ConfigError, match="nope"):
        cache_policy_class("nope")
    with pytest.raises(ConfigError, match="belady"):  # offline: not usable online
        cache_policy_class("belady")


def test_lru_adapter_matches_vllm_lru():
    """Same calls to kvstore's LRU (through the adapter) and vLLM's LRU: same victims, down to
    the last chunk (a touched prefix is read head last: its tail goes first)."""
    ours = CachePolicyFactory.get_cache_policy_cls("kvstore_lru", MODULE)(cache_capacity=8)
    ref = CachePolicyFactory.get_cache_policy_cls("lru")(cache_capacity=8)
    ctx = ReqContext(req_id="r")
    for pol in (ours, ref):
        for i in range(6):
            c = ChunkStatus(i)
            c.ref_cnt = 0
            pol.insert(key(i), c)
        pol.touch([key(1), key(3), key(4)], ctx)
    for n, protected in [(1, set()), (2, {key(2)}), (1, set()), (2, set())]:
        a, b = ours.evict(n, protected), ref.evict(n, protected)
        assert [k for k, _ in a] == [k for k, _ in b]
    assert not ours.chunks and ref.get(key(1)) is None  # all six went, in the same order


def test_adapter_skips_busy_and_is_atomic():
    pol = cache_policy_class("asym")(cache_capacity=4)
    ctx = ReqContext(req_id="r")
    for i in range(3):
        ctx.set_offload_key_position(key(i), (i + 1) * 16)
    pol.on_store_miss([key(0), key(1), key(2)], ctx)
    for i in range(3):
        pol.insert(key(i), ChunkStatus(i))  # ref_cnt -1: being written
    assert pol.evict(1, set()) is None
    for i in range(3):
        pol.get(key(i)).ref_cnt = 0
        pol.mark_evictable(key(i))
    assert pol.evict(4, set()) is None and all(pol.get(key(i)) is not None for i in range(3))  # atomic
    assert pol.info.position[[0, 1, 2]].tolist() == [16, 32, 48]
    (victim, chunk), = pol.evict(1, {key(0)})
    assert victim == key(2) and chunk.chunk_id == 2  # the chain 0 -> 1 -> 2: only its tail is a leaf
    assert pol.get(key(2)) is None
    pol.clear()
    assert pol.get(key(0)) is None


def test_adapter_evicts_prefix_leaves_in_rounds_and_stays_atomic():
    """Two chains (a: 4 chunks, b: 2 chunks) learned from head-to-tail key lists. asym alone would
    take the cheapest chunks (the heads) first; the adapter takes leaves only, round by round (a
    chunk whose children all went is a leaf of the next round), and a request for more than can
    go changes nothing."""
    pol = cache_policy_class("asym")(cache_capacity=8)
    ctx = ReqContext(req_id="r")
    a, b = [key(i) for i in range(4)], [key(10 + i) for i in range(2)]
    for chain in (a, b):
        for j, k in enumerate(chain):
            ctx.set_offload_key_position(k, (j + 1) * 16)
        pol.on_store_miss(chain, ctx)
    for i, k in enumerate(a + b):
        c = ChunkStatus(i)
        c.ref_cnt = 0
        pol.insert(k, c)
    pol.touch(b, ctx)  # b read again: its chunks outrank a's
    assert pol.evict(7, set()) is None and len(pol.chunks) == 6  # only 6 exist: atomic
    assert pol.evict(6, {b[0]}) is None and len(pol.chunks) == 6  # b[0] protected: 5 can go
    got = [k for k, _ in pol.evict(5, set())]
    assert sorted(got) == sorted(a[1:] + b) and list(pol.chunks) == [a[0]]
    assert got.index(a[3]) < got.index(a[2]) < got.index(a[1]) and got.index(b[1]) < got.index(b[0])  # tails first
    assert got[:2] == [a[3], b[1]]  # round 1: the two leaves, a's first (b was read again)
