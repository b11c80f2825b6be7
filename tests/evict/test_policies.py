"""The policy protocol, checked for every registered policy against a model of the resident set."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.errors import ConfigError
from kvstore.evict import POLICIES, BlockInfo, EvictionPolicy, make_policy, register_policy
from kvstore.evict.cost import CostModel
from kvstore.evict.lru import LRU
from kvstore.evict.trace import Trace

ONLINE = sorted(n for n, cls in POLICIES.items() if not cls.offline)
NUM_BLOCKS = 40


def _info(seed: int = 0) -> BlockInfo:
    rng = np.random.default_rng(seed)
    info = BlockInfo(NUM_BLOCKS)
    info.position[:NUM_BLOCKS] = rng.integers(0, 64, NUM_BLOCKS) * 16
    info.num_tokens[:NUM_BLOCKS] = 16
    info.size_bytes[:NUM_BLOCKS] = 4096
    cost = CostModel.preset("tiny")
    info.recompute_cost[:NUM_BLOCKS] = cost.recompute_flops(info.position[:NUM_BLOCKS], 16)
    info.reload_cost[:NUM_BLOCKS] = cost.reload_seconds(4096)
    return info


@pytest.mark.parametrize("name", ONLINE)
@settings(max_examples=25, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["insert", "access", "evict"]), st.integers(0, 2**31)), min_size=1, max_size=60))
def test_protocol_against_resident_set_model(name, ops):
    """victims: at most n, distinct, resident, never protected, fewer only when it must; naming
    victims twice without removing them is allowed; len tracks the resident set."""
    info = _info()
    policy = make_policy(name, info)
    resident: set[int] = set()
    clock = 0
    for op, seed in ops:
        rng = np.random.default_rng(seed)
        if op == "insert":
            fresh = [b for b in rng.permutation(NUM_BLOCKS).tolist() if b not in resident][: int(rng.integers(1, 5))]
            clock += len(fresh)
            info.access_count[fresh] = 1
            policy.on_insert(np.asarray(fresh))
            resident.update(fresh)
        elif op == "access" and resident:
            some = rng.choice(sorted(resident), size=min(len(resident), 3), replace=False)
            info.access_count[some] += 1
            policy.on_access(some.tolist())
        elif op == "evict" and resident:
            n = int(rng.integers(1, 6))
            protected = rng.choice(sorted(resident), size=min(len(resident), 2), replace=False)
            first = policy.victims(n, protected)
            again = policy.victims(n, protected)
            for v in (first, again):
                assert v.dtype == np.int64 and v.ndim == 1
                assert len(set(v.tolist())) == v.size <= n
                assert set(v.tolist()) <= resident - set(protected.tolist())
                assert v.size == min(n, len(resident - set(protected.tolist())))
            policy.on_remove(first)
            resident.difference_update(first.tolist())
            info.access_count[first] = 0
        assert len(policy) == len(resident)


def test_lru_order_and_protection():
    lru = LRU()
    lru.on_insert([1, 2, 3, 4])
    lru.on_access(np.array([2, 1]))
    assert lru.victims(2).tolist() == [3, 4]
    assert lru.victims(3, protected=[4]).tolist() == [3, 2, 1]
    lru.on_remove([3])
    assert lru.victims(10).tolist() == [4, 2, 1]
    assert lru.victims(0).size == 0


def test_asym_prefers_evicting_cheap_early_blocks():
    info = _info()
    asym = make_policy("asym", info)
    early, late = int(np.argmin(info.position[:NUM_BLOCKS])), int(np.argmax(info.position[:NUM_BLOCKS]))
    info.access_count[[late, early]] = 1
    asym.on_insert([late, early])  # the late block is older but costs more to recompute
    assert asym.victims(1).tolist() == [early]


def test_registry_errors_and_binding():
    with pytest.raises(ConfigError, match="unknown eviction policy 'nope'"):
        make_policy("nope")
    with pytest.raises(ConfigError, match="already registered"):
        register_policy("lru")(type("Other", (LRU,), {}))
    assert POLICIES["lru"] is LRU  # the failed registration left the registry unchanged
    info = BlockInfo(4)
    mine = LRU()
    assert make_policy(mine, info) is mine and mine.info is info
    for needs_info in ("gdsf", "asym", "belady", "belady-cost"):
        with pytest.raises(ConfigError, match="needs a BlockInfo"):
            make_policy(needs_info)
    with pytest.raises(ConfigError, match="compute_throughput"):
        make_policy("asym", info, compute_throughput=0.0)


def test_offline_policies_need_prepare():
    info = BlockInfo(8)
    for name in ("belady", "belady-cost"):
        policy = make_policy(name, info)
        assert policy.offline and isinstance(policy, EvictionPolicy)
        with pytest.raises(ConfigError, match="prepare"):
            policy.on_insert([0]) if name == "belady" else policy.victims(1)
        policy.prepare(Trace.from_requests([[0, 1]]))
        policy.on_insert([0, 1])
        assert len(policy) == 2


@pytest.mark.parametrize("name", ONLINE)
@settings(max_examples=25, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["insert", "access", "evict"]), st.integers(0, 2**31)), min_size=1, max_size=60))
def test_protection_mask_names_what_protected_ids_name(name, ops):
    """``victims(n, mask)`` (a bool mask over block ids, possibly shorter than the largest id)
    names exactly what ``victims(n, ids)`` names, call after call, on two policies driven alike."""
    info = _info()
    by_mask, by_ids = make_policy(name, info), make_policy(name, info)
    resident: set[int] = set()
    for op, seed in ops:
        rng = np.random.default_rng(seed)
        if op == "insert":
            fresh = [b for b in rng.permutation(NUM_BLOCKS).tolist() if b not in resident][: int(rng.integers(1, 5))]
            info.access_count[fresh] = 1
            by_mask.on_insert(np.asarray(fresh))
            by_ids.on_insert(np.asarray(fresh))
            resident.update(fresh)
        elif op == "access" and resident:
            some = rng.choice(sorted(resident), size=min(len(resident), 3), replace=False).tolist()
            info.access_count[some] += 1
            by_mask.on_access(some)
            by_ids.on_access(some)
        elif op == "evict" and resident:
            n = int(rng.integers(1, 6))
            mask = rng.random(int(rng.integers(0, NUM_BLOCKS + 1))) < 0.3
            got = by_mask.victims(n, mask)
            assert got.tolist() == by_ids.victims(n, np.flatnonzero(mask)).tolist()
            by_mask.on_remove(got)
            by_ids.on_remove(got)
            resident.difference_update(got.tolist())
            info.access_count[got] = 0


@pytest.mark.parametrize("name", ["lru", "asym"])
def test_leaf_victims_takes_tails_first_in_rounds_and_named_only_changes_nothing(name):
    """Chain 0 <- 1 <- 2 and chain 3 <- 4: leaves first, a parent once its child went; without
    ``take`` the protection mask, the child counts and the policy's residents are untouched."""
    from kvstore.evict import BlockInfo, make_policy
    from kvstore.evict.base import leaf_victims

    info = BlockInfo(8)
    info.recompute_cost[:5] = 1.0
    info.access_count[:5] = 1
    policy = make_policy(name, info)
    policy.on_insert(np.arange(5))
    parent = np.array([-1, 0, 1, -1, 3, -1, -1, -1])
    children = np.array([1, 1, 0, 1, 0, 0, 0, 0])
    protected = np.zeros(8, dtype=np.bool_)
    got = leaf_victims(policy, 4, protected, parent, children).tolist()
    assert sorted(got) == [1, 2, 3, 4] and got.index(2) < got.index(1) and got.index(4) < got.index(3)
    assert children.tolist() == [1, 1, 0, 1, 0, 0, 0, 0] and not protected.any() and len(policy) == 5
    protected[4] = True  # 4 stays, so 3 (its parent) stays too
    assert sorted(leaf_victims(policy, 5, protected, parent, children).tolist()) == [0, 1, 2]
