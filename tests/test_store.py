"""KVStore unit tests: append/read across tiers, eviction, lossless drop, fork, and every error
path leaving the store exactly as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from store_helpers import random_kv, requires_cuda
from kvstore.errors import (
    BlockStateError,
    CapacityError,
    ConfigError,
    KVStoreError,
    NonFiniteError,
    OutOfRangeError,
    ShapeError,
    UnknownSequenceError,
)
from kvstore.attn import multi_segment_attention
from kvstore.evict.base import BlockInfo
from kvstore.evict.lru import LRU
from kvstore.spec import KVSpec
from kvstore.store import KVStore

pytestmark = pytest.mark.usefixtures("copy_streams")  # every test with immediate and with late copies


def snapshot(store: KVStore) -> dict:
    """Everything observable about the store, to prove an error changed nothing."""
    snap = {"memory": store.memory(), "seqs": {}}
    for s in store.sequences:
        ids = store.block_table(s)
        k, v = store.read(s) if store.num_tokens(s) else (None, None)
        snap["seqs"][s] = (store.num_tokens(s), ids.tolist(), store.residency(ids).tolist(), k, v)
    return snap


def assert_same(a: dict, b: dict) -> None:
    assert a["memory"] == b["memory"]
    assert a["seqs"].keys() == b["seqs"].keys()
    for s in a["seqs"]:
        (na, ia, ra, ka, va), (nb, ib, rb, kb, vb) = a["seqs"][s], b["seqs"][s]
        assert (na, ia, ra) == (nb, ib, rb)
        if ka is not None:
            assert torch.equal(ka, kb) and torch.equal(va, vb)


class Truth:
    """Ground-truth K/V per sequence, and the recompute callable an engine would supply."""

    def __init__(self) -> None:
        self.kv: dict[int, torch.Tensor] = {}
        self.calls: list[tuple[int, int, int]] = []

    def __call__(self, seq: int, start: int, n: int) -> torch.Tensor:
        self.calls.append((seq, start, n))
        return self.kv[seq][:, :, start : start + n].clone()


def fill(store: KVStore, truth: Truth, spec: KVSpec, n: int, seed: int) -> int:
    s = store.create()
    kv = random_kv(spec, n, seed)
    truth.kv[s] = kv
    store.append(s, kv[:, 0], kv[:, 1])
    return s


def test_append_prefill_and_decode_read_back(small_spec):
    store = KVStore(small_spec, device_blocks=16)
    kv = random_kv(small_spec, 23, seed=1)
    s = store.create()
    store.append(s, kv[:, 0, :10], kv[:, 1, :10])  # prefill chunk
    store.append(s, kv[:, 0, 10:21], kv[:, 1, 10:21])
    for t in (21, 22):  # decode tokens, one layer at a time
        for layer in range(small_spec.num_layers):
            assert store.num_tokens(s) == t
            store.append(s, kv[layer, 0, t : t + 1], kv[layer, 1, t : t + 1], layer=layer)
    assert store.num_tokens(s) == 23
    assert store.block_table(s).numel() == small_spec.num_blocks(23)
    k, v = store.read(s)
    assert torch.equal(k, kv[:, 0]) and torch.equal(v, kv[:, 1])
    pos = torch.tensor([22, 0, 5, 5])
    k1, v1 = store.read(s, pos, layer=1)
    assert torch.equal(k1, kv[1, 0, pos]) and torch.equal(v1, kv[1, 1, pos])
    store.check()


def test_offload_load_round_trip_and_memory_accounting(small_spec):
    truth = Truth()
    store = KVStore(small_spec, device_blocks=8, host_blocks=8)
    s = fill(store, truth, small_spec, 30, seed=2)  # 8 blocks
    ids = store.block_table(s)
    mem = store.memory()
    assert mem["device"].blocks_used == 8 and mem["host"].blocks_used == 0
    store.offload(ids[2:6])
    assert store.residency(ids).tolist() == [0, 0, 1, 1, 1, 1, 0, 0]
    mem = store.memory()
    assert mem["device"].bytes_used == 4 * small_spec.bytes_per_block
    assert mem["host"].bytes_used == 4 * small_spec.bytes_per_block
    k, _ = store.read(s)  # read host blocks in place
    assert torch.equal(k, truth.kv[s][:, 0])
    store.load(ids[2:4])
    assert store.residency(ids).tolist() == [0, 0, 0, 0, 1, 1, 0, 0]
    assert store.memory()["host"].blocks_used == 4  # loaded blocks keep a clean host copy
    store.offload(ids[2:4])  # clean copies: no new host slots
    assert store.memory()["host"].blocks_used == 4
    k, v = store.read(s)
    assert torch.equal(k, truth.kv[s][:, 0]) and torch.equal(v, truth.kv[s][:, 1])
    store.check()


def test_offloaded_blocks_load_back_at_once(small_spec):
    """An offload's copies may still be in flight when the same blocks are loaded back."""
    truth = Truth()
    store = KVStore(small_spec, device_blocks=8, host_blocks=8)
    s = store.create()
    kv = random_kv(small_spec, 24, seed=12)
    truth.kv[s] = kv
    store.append(s, kv[:, 0], kv[:, 1])
    ids = store.block_table(s)
    store.offload(ids[:4])  # four consecutive device slots into four consecutive host slots
    store.load(ids[[3, 0, 2]])  # scattered host slots back
    k, v = store.read(s)
    assert torch.equal(k, kv[:, 0]) and torch.equal(v, kv[:, 1])
    store.check()


def test_device_full_evicts_lru_to_host(small_spec):
    truth = Truth()
    store = KVStore(small_spec, device_blocks=4, host_blocks=8)
    a = fill(store, truth, small_spec, 8, seed=3)  # 2 blocks
    b = fill(store, truth, small_spec, 8, seed=4)  # 2 blocks: device full
    store.read(a)  # a is now more recent than b
    c = fill(store, truth, small_spec, 8, seed=5)  # evicts b's blocks (least recently used)
    assert store.residency(store.block_table(b)).tolist() == [1, 1]
    assert store.residency(store.block_table(a)).tolist() == [0, 0]
    for s in (a, b, c):
        assert torch.equal(store.read(s)[0], truth.kv[s][:, 0])
    store.check()


def test_appending_to_an_offloaded_tail_brings_it_back_and_invalidates_the_host_copy(small_spec):
    truth = Truth()
    store = KVStore(small_spec, device_blocks=4, host_blocks=4)
    s = fill(store, truth, small_spec, 6, seed=6)  # tail block half full
    ids = store.block_table(s)
    store.offload(ids)
    more = random_kv(small_spec, 3, seed=7)
    store.append(s, more[:, 0], more[:, 1])
    truth.kv[s] = torch.cat([truth.kv[s], more], dim=2)
    assert store.residency(ids[1:]).tolist() == [0]
    assert store.memory()["host"].blocks_used == 1  # the written tail's host copy is gone
    assert torch.equal(store.read(s)[1], truth.kv[s][:, 1])
    store.check()


def test_lossless_drop_recomputes_only_the_missing_block(small_spec):
    truth = Truth()
    store = KVStore(small_spec, device_blocks=8, host_blocks=0, recompute=truth)
    s = fill(store, truth, small_spec, 14, seed=8)  # 4 blocks, the last has 2 tokens
    ids = store.block_table(s)
    store.drop(ids[[1, 3]])
    assert store.residency(ids).tolist() == [0, 3, 0, 3]
    k, v = store.read(s)
    assert torch.equal(k, truth.kv[s][:, 0]) and torch.equal(v, truth.kv[s][:, 1])
    assert sorted(truth.calls) == [(s, 4, 4), (s, 12, 2)]  # each block alone, at its own position
    store.ensure_resident(ids)
    assert store.residency(ids).tolist() == [0, 0, 0, 0]
    store.check()


def test_device_full_without_host_tier_drops_when_recompute_is_set(small_spec):
    truth = Truth()
    store = KVStore(small_spec, device_blocks=3, recompute=truth)
    a = fill(store, truth, small_spec, 8, seed=9)
    b = fill(store, truth, small_spec, 8, seed=10)  # one of a's blocks is dropped
    assert (store.residency(store.block_table(a)) == BlockInfo.TIER_NONE).sum() == 1
    for s in (a, b):
        assert torch.equal(store.read(s)[0], truth.kv[s][:, 0])
    store.check()


def test_fork_shares_full_blocks_and_copies_the_partial_one(small_spec):
    truth = Truth()
    store = KVStore(small_spec, device_blocks=8)
    s = fill(store, truth, small_spec, 10, seed=11)
    c = store.fork(s)
    ps, pc = store.block_table(s), store.block_table(c)
    assert pc[:2].tolist() == ps[:2].tolist() and pc[2] != ps[2]
    assert store.blocks.refcount[ps[:2].numpy()].tolist() == [2, 2]
    extra = random_kv(small_spec, 1, seed=12)
    store.append(c, extra[:, 0], extra[:, 1])
    assert torch.equal(store.read(s)[0], truth.kv[s][:, 0])  # the parent did not see the child's token
    store.free(s)
    assert torch.equal(store.read(c)[0][:, :10], truth.kv[s][:, 0])
    store.free(c)
    assert store.memory()["device"].blocks_used == 0
    store.check()


def test_policy_by_instance_and_offline_policy_refused(small_spec):
    lru = LRU()
    store = KVStore(small_spec, device_blocks=2, device_policy=lru)
    assert store.device_policy is lru and lru.info is store.blocks

    class Oracle(LRU):
        offline = True

    with pytest.raises(ConfigError, match="offline"):
        KVStore(small_spec, device_blocks=2, device_policy=Oracle())
    with pytest.raises(ConfigError, match="no-such-policy"):
        KVStore(small_spec, device_blocks=2, device_policy="no-such-policy")


def test_block_info_is_filled_for_cost_aware_policies(small_spec):
    store = KVStore(small_spec, device_blocks=8)
    s = store.create()
    kv = random_kv(small_spec, 10, seed=13)
    store.append(s, kv[:, 0], kv[:, 1])
    ids = store.block_table(s).numpy()
    info = store.blocks
    assert info.position[ids].tolist() == [0, 4, 8]
    assert info.num_tokens[ids].tolist() == [4, 4, 2]
    assert np.all(np.diff(info.recompute_cost[ids][:2]) > 0)  # a later full block costs more
    assert np.all(info.reload_cost[ids] > 0) and np.all(info.size_bytes[ids] == small_spec.bytes_per_block)


# ---------------------------------------------------------------------------- errors
@pytest.fixture
def loaded(small_spec):
    truth = Truth()
    store = KVStore(small_spec, device_blocks=6, host_blocks=4)
    a = fill(store, truth, small_spec, 9, seed=20)
    b = fill(store, truth, small_spec, 5, seed=21)
    store.offload(store.block_table(a)[:1])
    return store, truth, a, b


def _expect(store, exc, pattern, fn):
    before = snapshot(store)
    with pytest.raises(exc, match=pattern) as info:
        fn()
    assert isinstance(info.value, KVStoreError)
    assert_same(before, snapshot(store))
    store.check()


def test_errors_leave_state_unchanged(loaded, small_spec):
    store, truth, a, b = loaded
    good = random_kv(small_spec, 2, seed=22)
    k, v = good[:, 0], good[:, 1]
    three_heads = torch.randn(2, 2, 3, 8, generator=torch.Generator().manual_seed(5))
    _expect(store, ShapeError, r"shape \(2, 2, 3, 8\), expected \[2, T, 2, 8\]", lambda: store.append(a, three_heads, three_heads))
    _expect(store, ShapeError, "dtype torch.float16", lambda: store.append(a, k.half(), v.half()))
    _expect(store, ShapeError, "k has shape", lambda: store.append(a, k[0], v[0]))
    _expect(store, ShapeError, "shapes differ", lambda: store.append(a, k, v[:, :1]))
    _expect(store, ShapeError, "torch.Tensor", lambda: store.append(a, k.numpy(), v))
    _expect(store, OutOfRangeError, r"layer 5 out of range \[0, 2\)", lambda: store.append(a, k[0], v[0], layer=5))
    _expect(store, UnknownSequenceError, "unknown sequence 99", lambda: store.append(99, k, v))
    _expect(store, UnknownSequenceError, "unknown sequence 99", lambda: store.read(99))
    _expect(store, OutOfRangeError, r"positions \[9\] out of range \[0, 9\)", lambda: store.read(a, [0, 9]))
    _expect(store, OutOfRangeError, r"block ids \[1000\] out of range", lambda: store.offload([1000]))
    _expect(store, OutOfRangeError, r"block ids \[-1\]", lambda: store.load([-1]))
    _expect(store, ShapeError, "integers", lambda: store.load([0.5]))
    on_host = store.block_table(a)[:1]
    _expect(store, BlockStateError, "not on the device tier", lambda: store.offload(on_host))
    _expect(store, ConfigError, "no recompute callable", lambda: store.drop(store.block_table(b)))


def test_nonfinite_rejected_by_default_allowed_by_config(small_spec):
    store = KVStore(small_spec, device_blocks=4)
    s = store.create()
    kv = random_kv(small_spec, 3, seed=23)
    k = kv[:, 0].clone()
    k[1, 2, 0, 3] = float("nan")
    k[0, 0, 1, 1] = float("inf")
    _expect(store, NonFiniteError, "2 NaN/Inf", lambda: store.append(s, k, kv[:, 1]))
    assert store.num_tokens(s) == 0
    lenient = KVStore(small_spec, device_blocks=4, allow_nonfinite=True)
    t = lenient.create()
    lenient.append(t, k, kv[:, 1])
    assert torch.isnan(lenient.read(t)[0][1, 2, 0, 3])


def test_double_free_and_use_after_free(loaded):
    store, _, a, _ = loaded
    ids = store.block_table(a)
    store.free(a)
    _expect(store, UnknownSequenceError, f"unknown sequence {a}", lambda: store.free(a))
    _expect(store, BlockStateError, "not live", lambda: store.load(ids))


def test_append_when_device_full_and_nothing_evictable_names_numbers(small_spec):
    store = KVStore(small_spec, device_blocks=2, host_blocks=0)
    truth = Truth()
    s = fill(store, truth, small_spec, 8, seed=24)  # both device blocks
    more = random_kv(small_spec, 1, seed=25)
    # No host tier and no recompute callable: evicting would lose data.
    _expect(store, CapacityError, r"device tier full \(2 blocks\), there is no host tier",
            lambda: store.append(s, more[:, 0], more[:, 1]))
    # With a host tier, its own blocks are protected while being written: a 3-block chunk cannot fit.
    store2 = KVStore(small_spec, device_blocks=2, host_blocks=8)
    t = store2.create()
    big = random_kv(small_spec, 9, seed=26)
    _expect(store2, CapacityError, r"device tier full: 2 of 2 blocks free, 1 more needed, but only 0 of its 0 resident",
            lambda: store2.append(t, big[:, 0], big[:, 1]))


def test_offload_when_host_full_without_recompute(small_spec):
    truth = Truth()
    store = KVStore(small_spec, device_blocks=8, host_blocks=1)
    s = fill(store, truth, small_spec, 8, seed=27)
    ids = store.block_table(s)
    store.offload(ids[:1])
    _expect(store, CapacityError, r"host tier full: need 1 free blocks, 0 of 1 are free",
            lambda: store.offload(ids[1:]))


def test_load_when_host_copy_is_gone(small_spec):
    truth = Truth()
    store = KVStore(small_spec, device_blocks=8, host_blocks=2, recompute=truth)
    s = fill(store, truth, small_spec, 8, seed=28)
    ids = store.block_table(s)
    store.drop(ids[:1])
    _expect(store, BlockStateError, r"blocks \[\d+\] have no host copy", lambda: store.load(ids))
    store.ensure_resident(ids)  # the lossless path recomputes it
    assert torch.equal(store.read(s)[0], truth.kv[s][:, 0])


def test_bad_recompute_output_is_a_typed_error(small_spec):
    store = KVStore(small_spec, device_blocks=4, recompute=lambda s, a, n: torch.zeros(1))
    s = store.create()
    kv = random_kv(small_spec, 4, seed=29)
    store.append(s, kv[:, 0], kv[:, 1])
    store.drop(store.block_table(s))
    with pytest.raises(ShapeError, match=r"recompute\(0, 0, 4\) returned"):
        store.read(s)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(device_blocks=0), r"device_blocks 0 out of range \[1, "),
        (dict(device_blocks=-3), r"device_blocks -3 out of range \[1, "),
        (dict(device_blocks=4, host_blocks=2.5), "host_blocks.*2.5"),
        (dict(device_blocks=4, recompute=3), "recompute must be callable"),
    ],
)
def test_bad_config(small_spec, kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        KVStore(small_spec, **kwargs)


@requires_cuda
def test_cuda_store_uses_pinned_host_and_async_copies(small_spec):
    truth = Truth()
    store = KVStore(small_spec, device_blocks=4, host_blocks=8, device="cuda")
    assert store.host_pool.is_pinned and store.device_pool.kv.is_cuda
    s = store.create()
    kv = random_kv(small_spec, 16, seed=30, device="cuda")
    truth.kv[s] = kv
    store.append(s, kv[:, 0], kv[:, 1])
    ids = store.block_table(s)
    handle = store.offload(ids[[0, 2]])
    handle.synchronize()
    assert handle.done() and handle.num_bytes == 2 * small_spec.bytes_per_block
    store.load(ids)
    assert torch.equal(store.read(s)[0], kv[:, 0])
    store.check()


# ----------------------------------------------------------------------------- fetch and attend
def _spread(store: KVStore, s: int, truth: Truth) -> None:
    """Leave blocks of ``s`` on every tier: some on the device, some on the host only, some dropped."""
    ids = store.block_table(s)
    store.offload(ids[1:6])
    if store.recompute is not None:
        store.drop(ids[[2, 7]])


@pytest.mark.parametrize("lossless", [False, True])
def test_fetch_reads_one_layer_wherever_the_blocks_lie(small_spec, lossless):
    truth = Truth()
    store = KVStore(small_spec, device_blocks=12, host_blocks=12, recompute=truth if lossless else None)
    s = fill(store, truth, small_spec, 38, seed=41)
    _spread(store, s, truth)
    g = torch.Generator().manual_seed(42)
    positions = torch.stack([torch.randperm(38, generator=g)[:11] for _ in range(small_spec.num_kv_heads)])
    positions[0, 3] = -1  # no row
    moved = store.mover.stats.h2d_bytes
    for layer in range(small_spec.num_layers):
        k, v = store.fetch(s, layer, positions)
        kv = truth.kv[s][layer]  # [2, T, Hkv, D]
        for h in range(small_spec.num_kv_heads):
            want = positions[h].clamp_min(0)
            exp_k, exp_v = kv[0, want, h], kv[1, want, h]
            exp_k[positions[h] < 0] = 0
            exp_v[positions[h] < 0] = 0
            assert torch.equal(k[h], exp_k) and torch.equal(v[h], exp_v)
    store.end_step()
    host_rows = 0
    for h in range(small_spec.num_kv_heads):  # rows whose block lives on the host tier only
        blk = positions[h][positions[h] >= 0] // small_spec.block_size
        host_rows += int((store.residency(store.block_table(s)[blk]) == BlockInfo.TIER_HOST).sum())
    row = 2 * small_spec.head_dim * 4
    assert int(store.mover.row_bytes) == small_spec.num_layers * host_rows * row  # only what was read
    assert store.mover.stats.h2d_bytes == moved  # no whole block moved (recomputed ones are written in place)
    store.check()


@pytest.fixture
def attn_spec() -> KVSpec:
    """small_spec with a head_dim the attention kernels take."""
    return KVSpec(num_layers=2, num_kv_heads=2, num_q_heads=4, head_dim=64, dtype=torch.float32, block_size=4)


@pytest.mark.parametrize("queries", [1, 3])
def test_attend_every_token_equals_dense_attention_whatever_the_tiers(attn_spec, queries):
    truth = Truth()
    store = KVStore(attn_spec, device_blocks=4, host_blocks=6, recompute=truth)  # the context does not fit
    s = store.create()
    kv = random_kv(attn_spec, 46, seed=43)
    truth.kv[s] = kv
    for start in range(0, 46, 8):
        store.append(s, kv[:, 0, start : start + 8], kv[:, 1, start : start + 8])
    g = torch.Generator().manual_seed(44)
    q = torch.randn(queries, attn_spec.num_q_heads, attn_spec.head_dim, generator=g)
    for layer in range(attn_spec.num_layers):
        out, lse = store.attend(s, layer, q)
        ref, ref_lse = multi_segment_attention(q, [(kv[layer, 0], kv[layer, 1])], causal_last=True)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    store.end_step()
    store.check()


class FailsLater(Truth):
    """A recompute callable that works ``ok`` times, then misbehaves as ``fault``: raises, returns
    a block of the wrong shape, or one holding a NaN."""

    def __init__(self, ok: int, fault: str) -> None:
        super().__init__()
        self.ok, self.fault = ok, fault

    def __call__(self, seq: int, start: int, n: int) -> torch.Tensor:
        kv = super().__call__(seq, start, n)
        if len(self.calls) <= self.ok:
            return kv
        if self.fault == "raise":
            raise RuntimeError("the engine failed")
        if self.fault == "shape":
            return kv[:, :, :1]
        return kv.index_fill(2, torch.tensor([0]), float("nan"))


def _exact_state(store: KVStore):
    """Bookkeeping, policy order and both pools' bytes (after the copies in flight landed), read
    without touching anything."""
    b, n = store.blocks, store._next_id
    for pool in (store.device_pool, store.host_pool):
        store.mover.wait_writes(pool)
    meta = (
        [getattr(b, f)[:n].tolist() for f in ("dev_slot", "host_slot", "tier", "filled", "last_access", "access_count")],
        [p._free[: p.num_free].tolist() for p in (store.device_pool, store.host_pool)],
        [p.victims(len(p)).tolist() for p in (store.device_policy, store.host_policy)],
        store._clock,
    )
    return meta, [p.kv.clone() for p in (store.device_pool, store.host_pool)]


@pytest.mark.parametrize("fault", ["raise", "shape", "nan"])
@pytest.mark.parametrize("ok", [0, 2, 3])
def test_attend_every_token_is_all_or_nothing_when_recompute_fails_in_a_later_chunk(attn_spec, fault, ok):
    """A sequence three times the device tier, with blocks on every tier: attention reads it in
    several chunks. A recompute that fails at its ``ok + 1``-th call (a later chunk) raises that
    error and leaves the store exactly as it was: bookkeeping, policy order, pool bytes."""
    truth = FailsLater(ok=10**9, fault=fault)
    store = KVStore(attn_spec, device_blocks=4, host_blocks=5, recompute=truth, device="cpu")
    s = store.create()
    kv = random_kv(attn_spec, 46, seed=47)
    truth.kv[s] = kv
    for start in range(0, 46, 8):
        store.append(s, kv[:, 0, start : start + 8], kv[:, 1, start : start + 8])
    store.drop(store.block_table(s)[9:10])  # a dropped block past the first chunk too
    tiers = store.residency(store.block_table(s))
    assert {int(t) for t in tiers} == {BlockInfo.TIER_DEVICE, BlockInfo.TIER_HOST, BlockInfo.TIER_NONE}
    assert np.flatnonzero(tiers == BlockInfo.TIER_NONE).tolist() == [0, 1, 2, 9]
    q = torch.randn(2, attn_spec.num_q_heads, attn_spec.head_dim, generator=torch.Generator().manual_seed(48))
    before = _exact_state(store)
    truth.calls.clear()
    truth.ok = ok
    with pytest.raises(RuntimeError if fault == "raise" else ShapeError if fault == "shape" else NonFiniteError):
        store.attend(s, 1, q)
    meta, pools = _exact_state(store)
    assert meta == before[0], "a failed attend changed the store's bookkeeping"
    for got, was in zip(pools, before[1]):
        assert torch.equal(got.view(torch.int32), was.view(torch.int32)), "a failed attend changed a pool"
    store.check()
    truth.ok = 10**9  # the same call with a working callable then succeeds, exactly
    out, _ = store.attend(s, 1, q)
    ref, _ = multi_segment_attention(q, [(kv[1, 0], kv[1, 1])], causal_last=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    store.check()


def test_attend_to_a_selection_equals_attention_over_those_tokens(attn_spec):
    truth = Truth()
    store = KVStore(attn_spec, device_blocks=12, host_blocks=12)
    s = fill(store, truth, attn_spec, 30, seed=45)
    _spread(store, s, truth)
    positions = torch.tensor([[0, 4, 5, 17, 29], [1, 2, 9, 20, 28]])
    q = torch.randn(1, attn_spec.num_q_heads, attn_spec.head_dim, generator=torch.Generator().manual_seed(46))
    out, _ = store.attend(s, 1, q, positions)
    group = attn_spec.num_q_heads // attn_spec.num_kv_heads
    kv = truth.kv[s][1]
    for h in range(attn_spec.num_kv_heads):
        seg = (kv[0, positions[h], h : h + 1], kv[1, positions[h], h : h + 1])
        ref, _ = multi_segment_attention(q[:, h * group : (h + 1) * group], [seg], causal_last=False)
        torch.testing.assert_close(out[:, h * group : (h + 1) * group], ref)


def test_fetch_and_attend_reject_bad_input_and_change_nothing(attn_spec):
    truth = Truth()
    store = KVStore(attn_spec, device_blocks=12, host_blocks=12)
    s = fill(store, truth, attn_spec, 20, seed=47)
    before = snapshot(store)
    q = torch.zeros(1, attn_spec.num_q_heads, attn_spec.head_dim) + 0.5
    for call, error, pattern in [
        (lambda: store.fetch(s, 0, torch.tensor([0, 1])), ShapeError, "positions must be a tensor"),
        (lambda: store.fetch(s, 0, torch.zeros(2, 3)), ShapeError, "integers"),
        (lambda: store.fetch(s, 0, torch.tensor([[0, 20], [1, 2]])), OutOfRangeError, "from 20 to 20"),
        (lambda: store.fetch(s, 2, torch.zeros(2, 1, dtype=torch.long)), OutOfRangeError, "layer 2"),
        (lambda: store.attend(s, 0, q[0]), ShapeError, "q must be"),
        (lambda: store.attend(s, 0, q.double()), ShapeError, "no silent casts"),
        (lambda: store.attend(s, 0, q, torch.tensor([[-1, 0], [1, 2]])), OutOfRangeError, "from -1 to -1"),
        (lambda: store.attend(s + 1, 0, q), UnknownSequenceError, "unknown sequence"),
    ]:
        with pytest.raises(error, match=pattern):
            call()
        assert_same(snapshot(store), before)


class _Liar(LRU):
    """An LRU that names the same victim twice: the store must refuse it, not leak a slot."""

    def victims(self, n, protected=None):
        v = super().victims(1, protected)
        return np.concatenate([v, v])[:max(n, 2)]


def test_a_policy_breaking_the_contract_is_refused_and_changes_nothing(small_spec):
    from kvstore.errors import PolicyError

    store = KVStore(small_spec, device_blocks=3, host_blocks=8, device_policy=_Liar())
    truth = Truth()
    s = fill(store, truth, small_spec, 12, seed=61)  # the device tier is full
    before = snapshot(store)
    with pytest.raises(PolicyError, match="twice"):
        store.append(s, truth.kv[s][:, 0, :8], truth.kv[s][:, 1, :8])  # needs two victims
    assert_same(snapshot(store), before)
    store.check()
    with pytest.raises(PolicyError, match="already tracks"):
        KVStore(small_spec, device_blocks=3, device_policy=store.device_policy)


@pytest.mark.parametrize("host_blocks", [0, 8])
def test_without_a_host_tier_a_block_can_only_be_recomputed(small_spec, host_blocks):
    """What cost-aware policies read: no host tier, no reload (replay uses infinity too), so
    asym's miss cost is the position-dependent recompute cost alone."""
    store = KVStore(small_spec, device_blocks=8, host_blocks=host_blocks, device_policy="asym")
    s = fill(store, Truth(), small_spec, 20, seed=62)
    ids = store.block_table(s).numpy()
    reload = store.blocks.reload_cost[ids]
    assert (np.isinf(reload) if host_blocks == 0 else np.isfinite(reload) & (reload > 0)).all()
    recompute = store.blocks.recompute_cost[ids]
    assert (np.diff(recompute) > 0).all()  # a later block costs more to recompute


def test_blocks_know_their_parent_fanout_and_reads(small_spec):
    """What asym's reuse model reads: each block extends the one before it in its sequence, a fork's
    first own block extends the last block it shares, and reads count every read of a block."""
    store = KVStore(small_spec, device_blocks=16)
    s = store.create()
    store.append(s, *random_kv(small_spec, 10, seed=63).unbind(1))  # 3 blocks, the last partial
    a = store.block_table(s).numpy()
    child = store.fork(s)  # shares the 2 full blocks, copies the partial one
    c = store.block_table(child).numpy()
    b = store.blocks
    assert b.parent[a].tolist() == [-1, a[0], a[1]]
    assert b.parent[c[2]] == a[1] and c[2] != a[2]
    assert b.fanout[a].tolist() == [1, 2, 0]  # a[1] is a branch point: a[2] and the fork's copy
    before = b.reads[a].copy()
    store.read(s)
    store.read(s)
    assert (b.reads[a] == before + 2).all()
