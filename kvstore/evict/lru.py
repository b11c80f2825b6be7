"""LRU: evict the block whose last access is oldest."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from kvstore.evict.base import EvictionPolicy, as_block_array, register_policy


@register_policy("lru")
class LRU(EvictionPolicy):
    """Least recently used. The least recently used block is at the front of ``_order``."""

    def __init__(self, info=None) -> None:
        super().__init__(info)
        self._order: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def on_insert(self, blocks) -> None:
        order = self._order
        for b in as_block_array(blocks).tolist():
            order[b] = None
            order.move_to_end(b)

    def on_access(self, blocks) -> None:
        move = self._order.move_to_end
        for b in as_block_array(blocks).tolist():
            move(b)

    def on_remove(self, blocks) -> None:
        pop = self._order.pop
        for b in as_block_array(blocks).tolist():
            pop(b, None)

    def victims(self, n: int, protected=None) -> np.ndarray:
        skip = set(as_block_array(protected).tolist()) if protected is not None else ()
        out: list[int] = []
        if n > 0:
            for b in self._order:
                if b not in skip:
                    out.append(b)
                    if len(out) == n:
                        break
        return np.asarray(out, dtype=np.int64)
