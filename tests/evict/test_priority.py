"""Priority policies (lfu, gdsf, asym) against a sorted-list reference, victim for victim.

The reference keeps ``block -> (priority, tick)`` in a dict and sorts every live entry at each
``victims`` call: the documented order (smallest priority first, equal priorities by older
scoring) with none of the heap's laziness (pending entries, lent victims, stale entries,
compaction).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.evict import BlockInfo, make_policy
from kvstore.evict.cost import CostModel

NUM_BLOCKS = 48
THROUGHPUT = 400e12


def _info(seed: int) -> BlockInfo:
    """Few distinct positions, so equal priorities (ties) are common."""
    rng = np.random.default_rng(seed)
    info = BlockInfo(NUM_BLOCKS)
    info.position[:NUM_BLOCKS] = rng.integers(0, 4, NUM_BLOCKS) * 16
    info.num_tokens[:NUM_BLOCKS] = 16
    info.size_bytes[:NUM_BLOCKS] = 4096
    cost = CostModel.preset("tiny")
    info.recompute_cost[:NUM_BLOCKS] = cost.recompute_flops(info.position[:NUM_BLOCKS], 16)
    info.reload_cost[:NUM_BLOCKS] = np.where(rng.random(NUM_BLOCKS) < 0.5, cost.reload_seconds(4096), np.inf)
    return info


class SortedReference:
    """(priority, tick) order by sorting; ``credit`` is the policy's score without the clock."""

    def __init__(self, credit, greedy_dual: bool) -> None:
        self.credit = credit
        self.greedy_dual = greedy_dual
        self.clock = 0.0
        self.tick = 0
        self.entries: dict[int, tuple[float, int]] = {}
        self.count: dict[int, int] = {}  # lfu's own counts
        self.named: set[int] = set()  # named as victims since last scored: removing one is an eviction

    def score(self, blocks: list[int], hit: bool) -> None:
        for b in blocks:
            self.count[b] = self.count.get(b, 0) + 1 if hit else 1
        keys = self.credit(self, np.asarray(blocks, dtype=np.int64))
        for b, k in zip(blocks, keys):
            self.tick += 1
            self.entries[b] = (self.clock + k if self.greedy_dual else k, self.tick)
            self.named.discard(b)

    def remove(self, blocks: list[int]) -> None:
        for b in blocks:
            k, _ = self.entries.pop(b)
            self.count.pop(b)
            if self.greedy_dual and b in self.named:  # only an eviction ages, not a free
                self.clock = max(self.clock, k)
            self.named.discard(b)

    def victims(self, n: int, protected: list[int]) -> list[int]:
        order = sorted((e, b) for b, e in self.entries.items() if b not in protected)
        out = [b for _, b in order[:n]]
        self.named.update(out)
        return out


class ReuseReference:
    """asym's reuse chance by the documented rule, one block at a time in plain Python: a block's
    class is (min(fanout, 2), reads.bit_length()); a class is *entered* when a block is first
    scored or scored after a read, and *continued* when a block counted in it is read again;
    the chance is (continued + 1) / (entered + 2)."""

    def __init__(self) -> None:
        self.entered: dict[tuple[int, int], int] = {}
        self.continued: dict[tuple[int, int], int] = {}
        self.counted_in: dict[int, tuple[int, int]] = {}
        self.seen_reads: dict[int, int] = {}

    @staticmethod
    def cls(info, b: int) -> tuple[int, int]:
        return min(int(info.fanout[b]), 2), int(info.reads[b]).bit_length()

    def learn(self, info, b: int) -> None:
        reads = int(info.reads[b])
        if self.seen_reads.get(b) == reads:
            return
        if b in self.counted_in:
            old = self.counted_in[b]
            self.continued[old] = self.continued.get(old, 0) + 1
        k = self.cls(info, b)
        self.entered[k] = self.entered.get(k, 0) + 1
        self.counted_in[b], self.seen_reads[b] = k, reads

    def chance(self, info, b: int) -> float:
        k = self.cls(info, b)
        return (self.continued.get(k, 0) + 1) / (self.entered.get(k, 0) + 2)


def _asym_credit(ref, blocks, info):
    """A batch is learned first (every block's read counted), then scored."""
    reuse = ref.__dict__.setdefault("reuse", ReuseReference())
    for b in blocks.tolist():
        reuse.learn(info, b)
    cost = np.minimum(info.recompute_cost[blocks] * (1.0 / THROUGHPUT), info.reload_cost[blocks])
    return [reuse.chance(info, b) * c for b, c in zip(blocks.tolist(), cost.tolist())]


def _gdsf_credit(ref, blocks, info):
    return (info.access_count[blocks] * (info.recompute_cost[blocks] / np.maximum(info.size_bytes[blocks], 1))).tolist()


def _lfu_credit(ref, blocks, info):
    return [float(ref.count[b]) for b in blocks.tolist()]


CREDITS = {"asym": (_asym_credit, True), "gdsf": (_gdsf_credit, True), "lfu": (_lfu_credit, False)}

OPS = st.lists(
    st.tuples(st.sampled_from(["insert", "access", "access", "hot", "remove", "victims", "evict"]), st.integers(0, 2**31)),
    min_size=1,
    max_size=80,
)


@pytest.mark.parametrize("sort_at", [64, 4], ids=["heap", "heap+sort"])
@pytest.mark.parametrize("name", sorted(CREDITS))
@settings(max_examples=60, deadline=None)
@given(ops=OPS, seed=st.integers(0, 3))
def test_victims_match_sorted_reference(name, sort_at, ops, seed):
    """Same victims, in the same order, after any insert/access/remove/victims sequence;
    victims named and not removed (protected or asked twice) keep their place. With
    ``sort_at=4`` every ``victims(n >= 4)`` takes the partial-sort path (which drops the heap),
    interleaved with heap calls for smaller ``n`` (which rebuild it); a mask protecting most
    resident blocks takes the partial-sort path with either setting."""
    info = _info(seed)
    policy = make_policy(name, info, **({"compute_throughput": THROUGHPUT} if name == "asym" else {}))
    policy.sort_victims_at = sort_at
    credit, greedy_dual = CREDITS[name]
    ref = SortedReference(lambda r, blocks: credit(r, blocks, info), greedy_dual)
    resident: list[int] = []
    for op, op_seed in ops:
        rng = np.random.default_rng(op_seed)
        if op == "insert":
            fresh = [b for b in rng.permutation(NUM_BLOCKS).tolist() if b not in resident][: int(rng.integers(1, 9))]
            info.access_count[fresh] = 1
            info.reads[fresh] += 1
            info.fanout[fresh] = rng.integers(0, 4, len(fresh))  # leaves, chains and branch points
            policy.on_insert(np.asarray(fresh, dtype=np.int64))
            ref.score(fresh, hit=False)
            resident += fresh
        elif op in ("access", "hot") and resident:
            # "hot": a long batch with repeats (a shared prefix read over and over): stale
            # entries outnumber live ones, and the batch alone outgrows the heap
            size = int(rng.integers(1, 6)) if op == "access" else int(rng.integers(500, 5000))
            some = rng.choice(resident, size=size).tolist()
            np.add.at(info.access_count, some, 1)
            info.reads[some] += 1  # a block twice in one batch was read once (as replay counts)
            policy.on_access(some)
            ref.score(some, hit=True)
        elif op == "remove" and resident:
            gone = rng.choice(resident, size=int(rng.integers(1, min(4, len(resident)) + 1)), replace=False).tolist()
            policy.on_remove(gone)
            ref.remove(gone)
            info.access_count[gone] = 0
            resident = [b for b in resident if b not in gone]
        elif op in ("victims", "evict"):
            n = int(rng.integers(0, 7))
            # a few protected ids, or (as a bool mask, half the time) most of the resident blocks
            many = bool(rng.integers(2)) and len(resident) > 0
            size = int(rng.integers(len(resident) // 2, len(resident) + 1)) if many else int(rng.integers(0, 4))
            protected = rng.choice(resident, size=min(len(resident), size), replace=False).tolist() if resident else []
            if many:
                mask = np.zeros(NUM_BLOCKS, dtype=np.bool_)
                mask[protected] = True
                got = policy.victims(n, mask).tolist()
            else:
                got = policy.victims(n, np.asarray(protected, dtype=np.int64) if protected else None).tolist()
            assert got == ref.victims(n, protected)
            if op == "evict":
                policy.on_remove(got)
                ref.remove(got)
                info.access_count[got] = 0
                resident = [b for b in resident if b not in got]
        assert len(policy) == len(resident)
    assert policy.victims(NUM_BLOCKS).tolist() == ref.victims(NUM_BLOCKS, [])


def test_named_victims_keep_their_place_among_equal_priorities():
    """Victims named but not removed (protected ones included) go back where they were:
    equal priorities still evict the older scoring first."""
    lfu = make_policy("lfu")
    lfu.on_insert([1, 2, 3, 4])  # all priority 1, scored in this order
    assert lfu.victims(2, protected=[1, 2]).tolist() == [3, 4]
    assert lfu.victims(4).tolist() == [1, 2, 3, 4]
    assert lfu.victims(4).tolist() == [1, 2, 3, 4]
    lfu.on_access([2])
    assert lfu.victims(4).tolist() == [1, 3, 4, 2]


@pytest.mark.parametrize("name", ["asym", "gdsf"])
def test_freeing_a_block_does_not_age_the_clock(name):
    """Greedy-Dual's clock rises only on an eviction (a victim the policy named), never on a
    free: after a hot block is freed, a block read 1,000 times still outlives a fresh
    single-use block. Raising the clock on the free (the old behaviour) lifted the fresh
    block's score above the hot reader's and evicted the latter first."""
    info = BlockInfo(4)
    info.position[:4] = [0, 0, 0, 0]
    info.num_tokens[:4] = 16
    info.size_bytes[:4] = 4096
    info.recompute_cost[:4] = CostModel.preset("tiny").recompute_flops(info.position[:4], 16)
    info.reload_cost[:4] = np.inf
    policy = make_policy(name, info)
    info.access_count[[0, 1]] = info.reads[[0, 1]] = 1
    policy.on_insert(np.array([0, 1]))
    for _ in range(1000):  # block 0 is read 1,000 times, block 1 (the hot one) 5,000
        info.access_count[0] += 1
        info.reads[0] += 1
        policy.on_access([0])
    for _ in range(5000):
        info.access_count[1] += 1
        info.reads[1] += 1
        policy.on_access([1])
    policy.on_remove([1])  # freed, not evicted
    assert policy.clock == 0.0
    info.access_count[2] = info.reads[2] = 1
    policy.on_insert(np.array([2]))  # fresh, single use
    assert policy.victims(1).tolist() == [2]
    fresh_score = policy.key(2)
    policy.on_remove([2])  # evicted: now the clock ages, to the victim's score
    assert policy.clock == fresh_score > 0.0
