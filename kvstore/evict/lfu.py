"""LFU: evict the block accessed the fewest times since it entered the tier."""

from __future__ import annotations

import numpy as np

from kvstore.evict.base import register_policy
from kvstore.evict.priority import PriorityPolicy


@register_policy("lfu")
class LFU(PriorityPolicy):
    """Least frequently used: priority = accesses since insertion (the insertion counts as
    one); ties evict the least recently used. Counts are the policy's own, so it needs no
    BlockInfo, and they are forgotten when a block leaves the tier."""

    def __init__(self, info=None) -> None:
        super().__init__(info)
        self._count: dict[int, int] = {}

    def priority(self, blocks: np.ndarray, hit: bool) -> list[float]:
        count = self._count
        out = []
        for b in blocks.tolist():
            c = count[b] = count.get(b, 0) + 1 if hit else 1
            out.append(c)
        return out

    def on_remove(self, blocks) -> None:
        super().on_remove(blocks)
        pop = self._count.pop
        for b in np.asarray(blocks, dtype=np.int64).reshape(-1).tolist():
            pop(b, None)
