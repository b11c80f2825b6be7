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

    _ARRAYS = {**PriorityPolicy._ARRAYS, "_count": (np.int64, 0)}

    def priority(self, blocks: np.ndarray, hit: bool) -> np.ndarray:
        if hit:
            np.add.at(self._count, blocks, 1)
        else:
            self._count[blocks] = 1
        return self._count[blocks].astype(np.float64)
