"""asym: AsymCache-style cost-aware eviction (the default policy for multi-segment recovery).

Evicting a block is not equally costly everywhere: recomputing a block at token position
``p`` costs its linear-layer FLOPs plus attention over the ``p`` tokens before it, so late
blocks cost more; a block with a copy one tier down costs only its reload. With
multi-segment attention a missing block is recomputed alone, so what an eviction costs is
exactly that block's own cost, and a policy can weigh blocks one by one.

Score (smallest evicted first), set when a block is inserted or accessed::

    H(b) = L + P(class_b) * c_b

    c_b     = min(recompute_cost_b / compute_throughput, reload_cost_b)   seconds to get b back
    class_b = (min(fanout_b, 2), bit_length(reads_b))                       where b is in the prefix tree
    P(k)    = (continued_k + 1) / (entered_k + 2)                         its chance of another read
    L       = the largest H evicted so far (the aging clock)

Why this form:

- It is Greedy-Dual (Young 1994; Cao & Irani 1997): each block holds credit on top of the
  clock ``L``; every eviction raises ``L`` to the victim's score, so a block not read for a
  while is overtaken by fresher ones. The credit is the expected price of evicting the block:
  the chance that it is read again times what that miss costs. With equal costs and equal
  chances it is LRU.
- ``c_b`` is the real price of a miss in seconds: position-aware recompute (linear FLOPs +
  attention over ``p`` earlier tokens) or, when the tier below holds a copy (finite
  ``reload_cost``), the cheaper of recompute and reload. Dividing by size, as GDSF does, is
  wrong here: a tier's capacity is counted in slots, and a partial block takes a whole one.
- ``P`` is learned online from the stream, per class of block, by Laplace's rule of succession:
  ``entered_k`` counts the times a block came to be in class ``k`` (first seen, or read again),
  ``continued_k`` the times a block in class ``k`` was read again. Nothing is fitted to a trace;
  the two features are what a KV cache knows and a CDN cache does not:

  - *fan-out* (how many distinct blocks have extended this one): 0 is a leaf, the tail of a
    turn, read again only if its conversation goes on; 1 is inside one conversation's chain;
    2 or more is a branch point (a system prompt, a shared document) whose reads come from
    many requests. Beyond 2 the count says how popular a branch is, which the reads say too.
  - *lifetime reads* in doublings (``info.reads``, kept across tiers, unlike ``access_count``;
    bins 0, 1, 2-3, 4-7, ...): a block read again is more likely to be read again, and the first
    re-read (1 against 2) is the strongest evidence there is, so it gets its own bin; the shared
    roots collect thousands of reads, so counting evidence in doublings keeps the classes few
    (3 x 64 at most) and each one well populated.

  A class never seen has ``P = 1/2``; the rule needs no prior beyond that, and adapts when the
  workload changes (its counts only grow, so it tracks the whole stream, not a window).
"""

from __future__ import annotations

import numpy as np

from kvstore.errors import ConfigError
from kvstore.evict.base import register_policy
from kvstore.evict.priority import GreedyDual

#: fan-out bins (0, 1, 2+) and read doublings per bin: the class index is fan * _DEPTHS + depth
_FANS, _DEPTHS = 3, 64


@register_policy("asym")
class Asym(GreedyDual):
    """Cost-aware Greedy-Dual whose credit is a block's learned reuse chance times its miss cost;
    see the module docstring for the score.

    Args:
        info: block facts (reads recompute_cost, reload_cost, fanout and reads).
        compute_throughput: FLOP/s that converts recompute FLOPs to seconds, to compare with
            reload seconds (default: CostModel's default, ~50% of an H100's dense bf16).
    """

    _ARRAYS = {
        **GreedyDual._ARRAYS,
        "_cls": (np.int16, 0),  # class at the block's last scoring
        "_seen": (np.int64, -1),  # info.reads at that scoring, -1: never scored
        "_slot": (np.int64, 0),  # scratch: a block's last index in the batch being learned
    }

    def __init__(self, info=None, *, compute_throughput: float = 400e12) -> None:
        if info is None:
            raise ConfigError("asym needs a BlockInfo (it reads recompute_cost and reload_cost)")
        if not compute_throughput > 0:
            raise ConfigError(f"asym compute_throughput must be > 0 FLOP/s, got {compute_throughput!r}")
        super().__init__(info)
        self._inv_tput = 1.0 / compute_throughput
        self._entered = np.zeros(_FANS * _DEPTHS, dtype=np.float64)
        self._continued = np.zeros(_FANS * _DEPTHS, dtype=np.float64)

    def reuse_chance(self, blocks: np.ndarray) -> np.ndarray:
        """``[n]`` the learned chance that each of ``blocks`` is read again, from its current class."""
        k = self._classes(blocks)
        return (self._continued[k] + 1.0) / (self._entered[k] + 2.0)

    def _classes(self, blocks: np.ndarray) -> np.ndarray:
        info = self.info
        fan = np.minimum(info.fanout[blocks], _FANS - 1)
        # reads.bit_length() (0 for 0; then 1, 2-3, 4-7, ...), from the float's exponent (frexp:
        # reads = m * 2**e with m in [0.5, 1)): exact for counts below 2**53
        depth = np.minimum(np.frexp(np.maximum(info.reads[blocks], 0).astype(np.float64))[1], _DEPTHS - 1)
        return (fan * _DEPTHS + depth).astype(np.int16)

    def _learn(self, blocks: np.ndarray) -> np.ndarray:
        """Count what ``blocks`` did since their last scoring; returns their current classes."""
        reads, seen, size = self.info.reads[blocks], self._seen[blocks], self._entered.size
        k = self._classes(blocks)
        moved = reads != seen  # first scoring, or read since
        if not moved.any():
            return k
        if blocks.size > 1:  # a block twice in one batch was read once: count its last place only
            at = np.arange(blocks.size)
            self._slot[blocks] = at
            moved &= self._slot[blocks] == at
        again = moved & (seen >= 0)
        if again.any():
            self._continued += np.bincount(self._cls[blocks[again]], minlength=size)
        self._entered += np.bincount(k[moved], minlength=size)
        self._cls[blocks[moved]] = k[moved]  # the class it is counted in until its next read
        self._seen[blocks] = reads
        return k

    def priority(self, blocks: np.ndarray, hit: bool) -> np.ndarray:
        info = self.info
        k = self._learn(blocks)
        chance = (self._continued[k] + 1.0) / (self._entered[k] + 2.0)
        cost = np.minimum(info.recompute_cost[blocks] * self._inv_tput, info.reload_cost[blocks])
        return self.clock + chance * cost
