"""asym: AsymCache-style cost-aware eviction (the default policy for multi-segment recovery).

Evicting a block is not equally costly everywhere: recomputing a block at token position
``p`` costs its linear-layer FLOPs plus attention over the ``p`` tokens before it, so late
blocks cost more; a block with a copy one tier down costs only its reload. With
multi-segment attention a missing block is recomputed alone, so what an eviction costs is
exactly that block's own cost, and a policy can weigh blocks one by one.

Score (smallest evicted first), set when a block is inserted or accessed::

    H(b) = L + log2(1 + n_b) * c_b

    c_b = min(recompute_cost_b / compute_throughput, reload_cost_b)   seconds to get b back
    n_b = info.access_count: reads since b entered a tier (1 at insertion)
    L   = the largest H removed so far (the aging clock)

Why this form:

- It is Greedy-Dual (Young 1994; Cao & Irani 1997): each block holds credit ``c_b`` on top
  of the clock ``L``; every eviction raises ``L`` to the victim's score, so a block not read
  for a while is overtaken by fresher ones. Plain Greedy-Dual with equal costs is exactly
  LRU (the reuse term below makes asym differ even then: it is LRU only when every cost is
  zero); for weighted paging Greedy-Dual is k-competitive, the best any online policy can guarantee. A block
  worth twice as much survives twice as much clock advance after its last read.
- ``c_b`` is the real price of a miss in seconds: position-aware recompute (linear FLOPs +
  attention over ``p`` earlier tokens) or, when the tier below holds a copy (finite
  ``reload_cost``), the cheaper of recompute and reload. Dividing by size, as GDSF does, is
  wrong here: a tier's capacity is counted in slots, and a partial block takes a whole one.
- ``log2(1 + n_b)`` is the expected-reuse term. A block read again is far more likely to be
  read again (its conversation continues), so frequency is evidence, but in a prefix tree
  the shared roots (system prompts) collect thousands of reads: a raw count (GDSF) would
  pin them for ages after their last use, so the evidence is counted in doublings.
"""

from __future__ import annotations

import numpy as np

from kvstore.errors import ConfigError
from kvstore.evict.base import register_policy
from kvstore.evict.priority import GreedyDual


@register_policy("asym")
class Asym(GreedyDual):
    """Cost-aware Greedy-Dual with log-frequency reuse; see the module docstring for the score.

    Args:
        info: block facts (reads recompute_cost, reload_cost and access_count).
        compute_throughput: FLOP/s that converts recompute FLOPs to seconds, to compare with
            reload seconds (default: CostModel's default, ~50% of an H100's dense bf16).
    """

    def __init__(self, info=None, *, compute_throughput: float = 400e12) -> None:
        if info is None:
            raise ConfigError("asym needs a BlockInfo (it reads recompute_cost and reload_cost)")
        if not compute_throughput > 0:
            raise ConfigError(f"asym compute_throughput must be > 0 FLOP/s, got {compute_throughput!r}")
        super().__init__(info)
        self._inv_tput = 1.0 / compute_throughput

    def priority(self, blocks: np.ndarray, hit: bool) -> np.ndarray:
        info = self.info
        reuse = np.log2(1.0 + info.access_count[blocks])
        cost = np.minimum(info.recompute_cost[blocks] * self._inv_tput, info.reload_cost[blocks])
        return self.clock + reuse * cost
