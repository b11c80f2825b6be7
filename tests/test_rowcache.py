"""The device row cache of the sparse fetch (kvstore/rowcache.py): exact, moves only misses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from store_helpers import random_kv, requires_cuda
from kvstore.errors import ConfigError
from kvstore.evict.base import BlockInfo
from kvstore.rowcache import RowCache
from kvstore.spec import KVSpec
from kvstore.store import KVStore
from kvstore.transfer import gather_host_rows

pytestmark = pytest.mark.usefixtures("copy_streams")

SPEC = KVSpec(num_layers=2, num_kv_heads=2, num_q_heads=4, head_dim=8, dtype=torch.float32, block_size=4)
TOKENS = 40


def _store(row_cache: int, kv: torch.Tensor) -> tuple[KVStore, int]:
    """A sequence of TOKENS tokens whose blocks all live on the host tier but the last two."""
    store = KVStore(SPEC, device_blocks=4, host_blocks=12, row_cache=row_cache)
    s = store.create()
    for start in range(0, TOKENS, 4):
        store.append(s, kv[:, 0, start : start + 4], kv[:, 1, start : start + 4])
    ids = store.block_table(s)[:-2]
    store.offload(ids[store.residency(ids) == BlockInfo.TIER_DEVICE])
    assert (store.residency(ids) == BlockInfo.TIER_HOST).all()
    return store, s


def _positions(seed: int, width: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(TOKENS, generator=g)[:width] for _ in range(SPEC.num_kv_heads)])


def _check_maps(cache: RowCache) -> None:
    """Every filled slot's token points back at it, and no token is in two slots."""
    C = cache.capacity
    for kind in range(2):
        for h in range(cache.token_of.shape[1]):
            tokens = cache.token_of[kind, h, :C]
            filled = (tokens >= 0).nonzero().flatten()
            assert torch.equal(cache.slot_of[kind, h, tokens[filled]], filled)
            assert int((cache.slot_of[kind, h, :-1] >= 0).sum()) == filled.numel()


@settings(max_examples=25, deadline=None)
@given(
    capacity=st.integers(8, 48),
    fetches=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 12), st.booleans()), min_size=1, max_size=8),
)
def test_cached_fetches_equal_uncached_ones_and_move_no_more(capacity, fetches):
    kv = random_kv(SPEC, TOKENS, seed=51)
    plain, s = _store(0, kv)
    cached, s2 = _store(capacity, kv)
    for seed, width, values in fetches:
        positions = _positions(seed, width)
        positions[1, 0] = -1  # a head that reads one row fewer
        for layer in range(SPEC.num_layers):
            want = plain.fetch(s, layer, positions, values=values)
            got = cached.fetch(s2, layer, positions, values=values)
            assert torch.equal(got[0], want[0])
            assert (got[1] is None) == (want[1] is None) and (got[1] is None or torch.equal(got[1], want[1]))
    plain.end_step()
    cached.end_step()
    assert int(cached.mover.row_bytes) <= int(plain.mover.row_bytes)
    for layer in range(SPEC.num_layers):
        if (s2, layer) in cached._row_caches:
            _check_maps(cached._row_caches[s2, layer])
    cached.check()


def test_a_repeated_fetch_moves_nothing_and_a_new_row_moves_once():
    kv = random_kv(SPEC, TOKENS, seed=52)
    store, s = _store(16, kv)
    row = SPEC.head_dim * 4
    positions = torch.tensor([[0, 1, 9, 20], [3, 4, 5, 6]])  # every block on the host tier
    store.fetch(s, 0, positions)
    assert int(store.mover.row_bytes) == 2 * 8 * row  # K and V of 8 rows
    store.fetch(s, 0, positions)
    assert int(store.mover.row_bytes) == 2 * 8 * row
    store.fetch(s, 0, torch.tensor([[0, 1, 9, 21], [3, 4, 5, 6]]))  # one new row
    assert int(store.mover.row_bytes) == 2 * 9 * row
    store.fetch(s, 1, positions)  # another layer, another cache
    assert int(store.mover.row_bytes) == 2 * 17 * row
    k, _ = store.fetch(s, 0, torch.tensor([[0, 1, 9, 21], [3, 4, 5, 6]]), values=False)
    assert torch.equal(k[0, 3], kv[0, 0, 21, 0])
    assert int(store.mover.row_bytes) == 2 * 17 * row


def test_least_recently_read_rows_leave_first():
    kv = random_kv(SPEC, TOKENS, seed=53)
    store, s = _store(4, kv)  # 4 slots: fetches of 2 rows per head
    row = SPEC.head_dim * 4
    a, b, c = torch.tensor([[0, 1], [0, 1]]), torch.tensor([[2, 3], [2, 3]]), torch.tensor([[4, 5], [4, 5]])
    for positions in (a, b, a, c):  # c takes b's slots (a was read after b)
        store.fetch(s, 0, positions, values=False)
    moved = int(store.mover.row_bytes)
    store.fetch(s, 0, a, values=False)
    assert int(store.mover.row_bytes) == moved  # a stayed
    store.fetch(s, 0, b, values=False)
    assert int(store.mover.row_bytes) == moved + 4 * row  # b left


def test_a_fetch_wider_than_half_the_cache_keeps_what_fits():
    kv = random_kv(SPEC, TOKENS, seed=54)
    store, s = _store(6, kv)
    row = SPEC.head_dim * 4
    positions = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])  # 5 rows per head: only 1 slot is surely free
    k, _ = store.fetch(s, 0, positions, values=False)
    assert torch.equal(k[1], kv[0, 0, 5:10, 1])
    assert int(store.mover.row_bytes) == 10 * row
    cache = store._row_caches[s, 0]
    assert int((cache.token_of[0] >= 0).sum()) == 2  # one row per head kept
    _check_maps(cache)
    store.fetch(s, 0, positions, values=False)
    assert int(store.mover.row_bytes) == (10 + 8) * row  # the kept rows hit


def test_the_cache_leaves_with_its_sequence_and_counts_its_bytes():
    kv = random_kv(SPEC, TOKENS, seed=56)
    store, s = _store(8, kv)
    store.fetch(s, 1, _positions(57, 3))
    assert store.row_cache_bytes() > 8 * 2 * SPEC.num_kv_heads * SPEC.head_dim * 4
    store.free(s)
    assert store.row_cache_bytes() == 0


@pytest.mark.parametrize("bad, shown", [(-1, "-1"), (2.0, "2.0"), (True, "True"), ("8", "'8'"), (2**40, str(2**40))])
def test_row_cache_size_is_validated(bad, shown):
    with pytest.raises(ConfigError, match=rf"KVStore.row_cache \(slots per KV head\) {shown}"):
        KVStore(SPEC, device_blocks=4, host_blocks=4, row_cache=bad)


def test_row_cache_size_takes_a_numpy_integer():
    store = KVStore(SPEC, device_blocks=4, host_blocks=4, row_cache=np.int64(8))
    assert store.row_cache == 8 and type(store.row_cache) is int


@requires_cuda
@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_host_row_gather_on_cuda_equals_the_cpu_gather(backend, monkeypatch):
    monkeypatch.setenv("KVSTORE_ROWS_BACKEND", backend)
    g = torch.Generator().manual_seed(58)
    src = torch.randn(1000, 64, generator=g).half().pin_memory()
    index = torch.randint(0, 1000, (8, 77), generator=g)
    mask = torch.rand(8, 77, generator=g) < 0.6
    want = gather_host_rows(src, index, mask, torch.device("cpu"))
    got = gather_host_rows(src, index.cuda(), mask.cuda(), torch.device("cuda"))
    assert torch.equal(got.cpu(), want)
