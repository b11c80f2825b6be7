"""FIFO: evict the block that entered the tier first; accesses change nothing."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from kvstore.evict.base import EvictionPolicy, as_block_list, first_unprotected, register_policy


@register_policy("fifo")
class FIFO(EvictionPolicy):
    """First in, first out. The oldest insertion is at the front of ``_order`` (an
    OrderedDict, whose front stays O(1) to reach after many removals, unlike a dict's)."""

    def __init__(self, info=None) -> None:
        super().__init__(info)
        self._order: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def on_insert(self, blocks) -> None:
        self._order.update(dict.fromkeys(as_block_list(blocks)))  # new keys go to the back, in order

    def on_access(self, blocks) -> None:
        return None

    def on_remove(self, blocks) -> None:
        pop = self._order.pop
        for b in as_block_list(blocks):
            pop(b, None)

    def victims(self, n: int, protected=None) -> np.ndarray:
        return first_unprotected(self._order, n, protected)
