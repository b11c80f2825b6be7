"""Built-in policies against libCacheSim (GPL; a test-only dependency), read for read.

Each policy runs alone on a unit-size block stream: one block per request, every miss admitted,
one victim per miss when the tier is full (:func:`ours`, through the protocol and
``checked_victims``), and libCacheSim's cache of the same algorithm and size gets the same
stream through ``cache.get(req)`` (:func:`theirs`). The per-read hit sequences are compared,
not only their totals. Streams: the flattened tiny Mooncake trace of tests/evict/data, and a
seeded stream of conversations that grow their prefixes under Zipf-popular system prompts.

Where libCacheSim's algorithm differs from ours by definition, a short reference in this file
implements both variants behind a switch: with libCacheSim's it matches libCacheSim hit for
hit, with ours it matches ours hit for hit, so each difference is named and is the only one.

- LRU, FIFO, LFU (ties: the block that reached its count first, libCacheSim's FIFO within a
  frequency), Belady and belady-cost with uniform costs: equal to libCacheSim outright.
- GDSF (libCacheSim: ``L + freq * 1e6 / size``): libCacheSim inserts first and evicts after,
  so an inserted block is scored with the clock from *before* the eviction that made room for
  it; ours (Cherkasova's order, and the protocol's: ``victims`` comes before ``on_insert``)
  scores it with the clock that eviction raised.
- ARC: libCacheSim adapts ``p`` on a ghost hit before choosing the victim, and breaks the
  ``|T1| == p`` tie towards T1 when the block comes from B2 (the paper's REPLACE). Our
  ``victims`` is asked before it learns which block comes in, so ``p`` adapts at
  ``on_insert``, after the victim was chosen, and there is no tie rule.
- S3-FIFO: libCacheSim's small FIFO holds ``int(0.1 * size)`` blocks (ours is configured to
  the same, ``small_fraction``), its ghost ``0.9 * size`` (set to 1.0, as ours), and
  libCacheSim (1) sends new blocks to the main FIFO while the small one is full before the
  first eviction (ours cannot: a policy learns its capacity at the first eviction), and (2)
  resets a block's counter when it is promoted from small to main (ours keeps it). Ours
  matches the reference read for read; libCacheSim matches its variant on most reads (the
  test says what is left), so against libCacheSim the totals are bounded.
- asym (libCacheSim has no counterpart): all costs zero is LRU (every score equals the clock,
  ties evict the older scoring); equal non-zero costs match a Greedy-Dual reference with
  credit ``P(class)``, the learned reuse chance of a block's read count in doublings.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from kvstore.evict import POLICIES
from kvstore.evict.base import BlockInfo, checked_victims, make_policy
from kvstore.evict.gdsf import GDSF
from kvstore.evict.replay import ReplayConfig, replay
from kvstore.evict.trace import Trace, load_mooncake

lcs = pytest.importorskip("libcachesim")

TINY = Path(__file__).parent / "data" / "tiny_mooncake.jsonl"
#: libCacheSim's GDSF weight of one read (``freq * 1e6 / obj_size``): our recompute_cost / size_bytes
GDSF_WEIGHT = 1e6


def generated_stream(seed: int, n: int = 4000) -> np.ndarray:
    """``n`` block reads: conversations, each opened under a Zipf-popular system prompt (shared
    4-block prefixes), re-read whole with a few new blocks per turn; half of the turns go to a
    Zipf-popular conversation, half to a uniform one. Never a single repeated id."""
    rng = np.random.default_rng(seed)
    convs: list[list[int]] = []
    out: list[int] = []
    next_id = 1000
    while len(out) < n:
        if not convs or rng.random() < 0.2:
            prompt = 4 * (int(rng.zipf(1.5)) % 20)
            convs.append(list(range(prompt, prompt + 4)))
        pick = int(rng.zipf(1.3)) - 1 if rng.random() < 0.5 else int(rng.integers(len(convs)))
        conv = convs[min(pick, len(convs) - 1)]
        turn = int(rng.integers(1, 5))
        conv += range(next_id, next_id + turn)
        next_id += turn
        out += conv
    return np.asarray(out[:n], dtype=np.int64)


def _dense(blocks: np.ndarray) -> Trace:
    """One request per block read (dense ids), for ``next_use`` and for replay."""
    return Trace.from_requests([[b] for b in blocks.tolist()], block_tokens=16)


STREAMS = {
    "tiny": _dense(load_mooncake(TINY).blocks),
    "generated": _dense(generated_stream(20261203)),
}
CAPACITIES = {"tiny": [20, 24, 32, 40], "generated": [20, 60, 200]}
CASES = [(s, c) for s in STREAMS for c in CAPACITIES[s]]


def ours(policy, trace: Trace, capacity: int, *, recompute_cost: float = GDSF_WEIGHT, **kwargs) -> np.ndarray:
    """``[reads]`` bool: which reads of ``trace.blocks`` hit under our ``policy`` (a name or a
    class) run alone: admit every miss, one victim per miss when full. Unit sizes; the
    BlockInfo is kept as replay keeps it (``last_access``: read index, ``access_count``: reads
    since the block entered, 0 once evicted)."""
    blocks = trace.blocks
    u = trace.num_unique_blocks
    info = BlockInfo(u)
    info.recompute_cost[:u] = recompute_cost
    info.size_bytes[:u] = 1
    info.reload_cost[:u] = np.inf
    p = policy(info, **kwargs) if isinstance(policy, type) else make_policy(policy, info, **kwargs)
    if p.offline:
        p.prepare(trace)
    resident = np.zeros(u, dtype=np.bool_)
    hits = np.zeros(blocks.size, dtype=np.bool_)
    held = 0
    for i, b in enumerate(blocks.tolist()):
        info.last_access[b] = i
        info.access_count[b] += 1
        info.reads[b] += 1
        if resident[b]:
            hits[i] = True
            p.on_access([b])
            continue
        if held == capacity:
            (v,) = checked_victims(p, 1, None, known=resident, available=held)
            p.on_remove([v])
            resident[v] = False
            info.access_count[v] = 0
            held -= 1
        resident[b] = True
        held += 1
        p.on_insert([b])
    return hits


def theirs(cache, trace: Trace) -> np.ndarray:
    """``[reads]`` bool: libCacheSim's ``cache.get`` of each read, objects of size 1 (Belady
    reads ``next_access_vtime``; a block never read again gets one past the end)."""
    req = lcs.Request()
    req.obj_size = 1
    nxt = trace.next_use().tolist()
    out = np.zeros(trace.num_block_requests, dtype=np.bool_)
    for i, b in enumerate(trace.blocks.tolist()):
        req.obj_id, req.clock_time, req.next_access_vtime = b, i, nxt[i]
        out[i] = cache.get(req)
    return out


def _same(a: np.ndarray, b: np.ndarray) -> None:
    diff = np.flatnonzero(a != b)
    assert diff.size == 0, f"{diff.size} reads differ, the first at read {diff[0]} ({int(a.sum())} vs {int(b.sum())} hits)"


# --- equal to libCacheSim outright ---------------------------------------------------------


@pytest.mark.parametrize("stream,capacity", CASES)
@pytest.mark.parametrize("name,cls", [("lru", "LRU"), ("fifo", "FIFO"), ("lfu", "LFU"), ("belady", "Belady")])
def test_equal_to_libcachesim(name, cls, stream, capacity):
    trace = STREAMS[stream]
    _same(ours(name, trace, capacity), theirs(getattr(lcs, cls)(capacity), trace))


@pytest.mark.parametrize("stream,capacity", CASES)
def test_belady_cost_with_uniform_costs_is_libcachesim_belady(stream, capacity):
    trace = STREAMS[stream]
    _same(ours("belady-cost", trace, capacity), theirs(lcs.Belady(capacity), trace))


def test_streams_are_not_trivial():
    for trace in STREAMS.values():
        assert trace.num_unique_blocks > 90 and trace.num_block_requests > 3 * trace.num_unique_blocks
    # every capacity leaves LRU short of the most any cache can hit (the compulsory misses aside)
    for stream, capacity in CASES:
        trace = STREAMS[stream]
        hits = int(ours("lru", trace, capacity).sum())
        assert 0 < hits < trace.num_block_requests - trace.num_unique_blocks, (stream, capacity, hits)


# --- GDSF: the clock an inserted block is scored with -----------------------------------------


def gdsf_reference(trace: Trace, capacity: int, *, clock_before_eviction: bool) -> np.ndarray:
    """GDSF with unit sizes, ``H = L + reads * 1e6``, ties by older scoring, in plain Python
    (an O(capacity) scan per eviction). ``clock_before_eviction``: an inserted block is scored
    with ``L`` from before the eviction its miss caused (libCacheSim), else after (ours)."""
    prio: dict[int, tuple[float, int]] = {}
    reads: dict[int, int] = {}
    clock = 0.0
    hits = np.zeros(trace.num_block_requests, dtype=np.bool_)
    for i, b in enumerate(trace.blocks.tolist()):
        if b in prio:
            hits[i] = True
            reads[b] += 1
            prio[b] = (clock + reads[b] * GDSF_WEIGHT, i)
            continue
        before = clock
        if len(prio) == capacity:
            victim = min(prio, key=prio.__getitem__)
            clock = prio.pop(victim)[0]
            del reads[victim]
        reads[b] = 1
        prio[b] = ((before if clock_before_eviction else clock) + GDSF_WEIGHT, i)
    return hits


@pytest.mark.parametrize("stream,capacity", CASES)
def test_gdsf_against_libcachesim(stream, capacity):
    trace = STREAMS[stream]
    _same(gdsf_reference(trace, capacity, clock_before_eviction=True), theirs(lcs.GDSF(capacity), trace))
    _same(ours("gdsf", trace, capacity), gdsf_reference(trace, capacity, clock_before_eviction=False))


def test_gdsf_clock_order_matters_on_these_streams():
    """The one difference is real here (else the reference pair above could hide another)."""
    assert any(
        (gdsf_reference(STREAMS[s], c, clock_before_eviction=True) != gdsf_reference(STREAMS[s], c, clock_before_eviction=False)).any()
        for s, c in CASES
    )
    assert issubclass(POLICIES["gdsf"], GDSF)


# --- ARC: when p adapts ----------------------------------------------------------------------


def arc_reference(trace: Trace, c: int, *, adapt_before_replace: bool) -> np.ndarray:
    """ARC (Megiddo & Modha, FAST'03, Fig. 4) with unit sizes and a real-valued ``p``.
    ``adapt_before_replace``: a ghost hit adapts ``p`` before REPLACE picks the victim, and
    REPLACE evicts from T1 at ``|T1| == p`` when the block comes from B2 (the paper,
    libCacheSim); else REPLACE runs with the old ``p`` and no tie rule, then ``p`` adapts
    (what a policy that learns the incoming block only at ``on_insert`` can do: ours)."""
    t1: OrderedDict[int, None] = OrderedDict()
    t2: OrderedDict[int, None] = OrderedDict()
    b1: OrderedDict[int, None] = OrderedDict()
    b2: OrderedDict[int, None] = OrderedDict()
    p = 0.0

    def replace(from_b2: bool) -> None:
        if t1 and (len(t1) > p or (adapt_before_replace and from_b2 and len(t1) == p)) or not t2:
            b1[t1.popitem(last=False)[0]] = None
        else:
            b2[t2.popitem(last=False)[0]] = None

    def adapt(x: int) -> float:
        if x in b1:
            return min(float(c), p + max(len(b2) / len(b1), 1.0))
        return max(0.0, p - max(len(b1) / len(b2), 1.0))

    hits = np.zeros(trace.num_block_requests, dtype=np.bool_)
    for i, x in enumerate(trace.blocks.tolist()):
        if x in t1:
            del t1[x]
            t2[x] = None
            hits[i] = True
        elif x in t2:
            t2.move_to_end(x)
            hits[i] = True
        elif x in b1 or x in b2:  # the cache is full: ghosts exist only after evictions
            from_b2 = x in b2
            if adapt_before_replace:
                p = adapt(x)
                replace(from_b2)
            else:
                replace(from_b2)
                p = adapt(x)
            (b2 if from_b2 else b1).pop(x)
            t2[x] = None
        else:
            if len(t1) + len(b1) == c:
                if len(t1) < c:
                    b1.popitem(last=False)
                    replace(False)
                else:
                    t1.popitem(last=False)
            elif len(t1) + len(t2) + len(b1) + len(b2) >= c:
                if len(t1) + len(t2) + len(b1) + len(b2) == 2 * c:
                    b2.popitem(last=False)
                replace(False)
            t1[x] = None
    return hits


@pytest.mark.parametrize("stream,capacity", CASES)
def test_arc_against_libcachesim(stream, capacity):
    trace = STREAMS[stream]
    _same(arc_reference(trace, capacity, adapt_before_replace=True), theirs(lcs.ARC(capacity), trace))
    _same(ours("arc", trace, capacity), arc_reference(trace, capacity, adapt_before_replace=False))


def test_arc_totals_near_libcachesim():
    """What the late adaptation costs on these streams: at most 5% of libCacheSim's hits
    (measured: 0 to -2.6%, the most at the smallest capacities, where ghost hits are most
    frequent; before the ghosts kept the paper's bounds: -50% on the generated stream at 20)."""
    for stream, capacity in CASES:
        trace = STREAMS[stream]
        mine, ref = int(ours("arc", trace, capacity).sum()), int(theirs(lcs.ARC(capacity), trace).sum())
        assert abs(mine - ref) <= 0.05 * ref, (stream, capacity, mine, ref)


# --- S3-FIFO: warm-up and promotion ---------------------------------------------------------


def s3fifo_reference(trace: Trace, capacity: int, *, small: int, ghost: int, warmup_to_main: bool,
                     reset_on_promotion: bool) -> np.ndarray:
    """S3-FIFO (Yang et al., SOSP'23) with unit sizes: a small FIFO (evicted from while it holds
    ``small`` blocks or more, or the main FIFO is empty), a main FIFO with 2-bit CLOCK counters,
    a ghost FIFO of ``ghost`` ids. A block read twice or more since insertion is promoted when
    it leaves the small FIFO. ``warmup_to_main``: until the first eviction, a new block goes to
    the main FIFO when the small one is full (libCacheSim). ``reset_on_promotion``: a promoted
    block's counter restarts at 0 (libCacheSim)."""
    s: OrderedDict[int, None] = OrderedDict()
    m: OrderedDict[int, None] = OrderedDict()
    g: OrderedDict[int, None] = OrderedDict()
    freq: dict[int, int] = {}
    evicted = False
    hits = np.zeros(trace.num_block_requests, dtype=np.bool_)
    for i, x in enumerate(trace.blocks.tolist()):
        if x in s or x in m:
            freq[x] = min(freq[x] + 1, 3)
            hits[i] = True
            continue
        if len(s) + len(m) == capacity:
            evicted = True
            done = False
            while not done:
                if s and (len(s) >= small or not m):
                    b = s.popitem(last=False)[0]
                    if freq[b] > 1:
                        m[b] = None
                        if reset_on_promotion:
                            freq[b] = 0
                    else:
                        g[b] = None
                        del freq[b]
                        done = True
                else:
                    b = m.popitem(last=False)[0]
                    if freq[b] > 0:
                        freq[b] -= 1
                        m[b] = None
                    else:
                        del freq[b]
                        done = True
            while len(g) > ghost:
                g.popitem(last=False)
        if g.pop(x, 0) is None or (warmup_to_main and not evicted and len(s) >= small):
            m[x] = None
        else:
            s[x] = None
        freq[x] = 0
    return hits


@pytest.mark.parametrize("stream,capacity", CASES)
def test_s3fifo_against_reference_and_libcachesim(stream, capacity):
    trace = STREAMS[stream]
    small = int(0.1 * capacity)  # libCacheSim's small FIFO size; it cannot hold a block below 2
    assert small >= 2
    # ours evicts from S while |S| > small_fraction * capacity: the same threshold
    mine = ours("s3fifo", trace, capacity, small_fraction=(small - 0.5) / capacity)
    _same(mine, s3fifo_reference(trace, capacity, small=small, ghost=capacity, warmup_to_main=False, reset_on_promotion=False))

    cache = lcs.S3FIFO(capacity, small_size_ratio=0.1, ghost_size_ratio=1.0, move_to_main_threshold=2)
    ref = theirs(cache, trace)
    # libCacheSim's two rules in the reference reproduce it on most reads, not all: its ghost
    # behaves as one id longer than ghost_size_ratio * size, and a few reinsertion orders in its
    # main FIFO (6 reads of the tiny trace at 32 blocks, 5% of the generated stream at 60) we
    # could not pin down through its Python API. Measured: 0-5.3% of reads differ; totals of
    # ours against libCacheSim -12.6% (the tiny trace at 20 blocks, all from the warm-up rule:
    # the reference with it matches there read for read) to +3.5%.
    like_lcs = s3fifo_reference(trace, capacity, small=small, ghost=capacity + 1, warmup_to_main=True, reset_on_promotion=True)
    assert (like_lcs != ref).mean() <= 0.06
    if (stream, capacity) in {("tiny", 20), ("tiny", 24), ("generated", 20)}:
        _same(like_lcs, ref)
    assert abs(int(mine.sum()) - int(ref.sum())) <= 0.15 * ref.sum()


# --- asym: no libCacheSim counterpart --------------------------------------------------------


@pytest.mark.parametrize("stream,capacity", CASES)
def test_asym_with_zero_costs_is_lru(stream, capacity):
    trace = STREAMS[stream]
    _same(ours("asym", trace, capacity, recompute_cost=0.0), theirs(lcs.LRU(capacity), trace))


def greedy_dual_reuse_reference(trace: Trace, capacity: int, cost: float) -> np.ndarray:
    """Greedy-Dual with credit ``P(class) * cost`` (asym's score with equal costs) in plain Python:
    on a unit-size stream no block extends another, so a block's class is its lifetime reads in
    doublings, ``reads.bit_length()``; ``P`` is Laplace's rule over the times a block entered
    the class and the times a block in it was read again. Ties by older scoring."""
    prio: dict[int, tuple[float, int]] = {}
    reads: dict[int, int] = {}
    counted_in: dict[int, int] = {}
    entered: dict[int, int] = {}
    continued: dict[int, int] = {}
    clock = 0.0
    hits = np.zeros(trace.num_block_requests, dtype=np.bool_)
    for i, b in enumerate(trace.blocks.tolist()):
        if b in prio:
            hits[i] = True
        elif len(prio) == capacity:
            victim = min(prio, key=prio.__getitem__)
            clock = max(clock, prio.pop(victim)[0])
        reads[b] = reads.get(b, 0) + 1
        if b in counted_in:
            continued[counted_in[b]] = continued.get(counted_in[b], 0) + 1
        k = reads[b].bit_length()
        entered[k] = entered.get(k, 0) + 1
        counted_in[b] = k
        prio[b] = (clock + (continued.get(k, 0) + 1) / (entered[k] + 2) * cost, i)
    return hits


@pytest.mark.parametrize("stream,capacity", CASES)
def test_asym_with_equal_costs_is_greedy_dual(stream, capacity):
    trace = STREAMS[stream]
    flops = 4e14  # one second at asym's default throughput
    got = ours("asym", trace, capacity, recompute_cost=flops)
    _same(got, greedy_dual_reuse_reference(trace, capacity, 1.0))
    assert (got != theirs(lcs.LRU(capacity), trace)).any() or capacity >= trace.num_unique_blocks  # reads count: not LRU


# --- the replay simulator on the same streams ------------------------------------------------


@pytest.mark.parametrize("name", sorted(set(POLICIES) - {"mru"}))
def test_replay_of_single_block_requests_is_the_stream(name):
    """replay, one block per request, counts the hits of the per-read run above (its costs
    differ: a block's recompute cost and bytes come from the model, the same for every block)."""
    trace = STREAMS["generated"]
    for capacity in CAPACITIES["generated"]:
        config = ReplayConfig(capacity_blocks=capacity, model="tiny")
        got = replay(trace, name, config).device_hits
        assert got == int(ours(name, trace, capacity, **_uniform(name, config, trace)).sum()), (name, capacity)


def _uniform(name: str, config: ReplayConfig, trace: Trace) -> dict:
    """The recompute cost replay gives every block of a one-block request, so policies that
    read it score alike (GDSF divides it by the bytes: the same constant either way)."""
    return {"recompute_cost": float(config.cost.recompute_flops(0, trace.block_tokens))} if name != "gdsf" else {}
