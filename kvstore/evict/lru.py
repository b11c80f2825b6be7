"""LRU: evict the block whose last access is oldest."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from kvstore.evict.base import EvictionPolicy, accessed_ids, as_block_list, first_unprotected, inserted_ids, register_policy


@register_policy("lru")
class LRU(EvictionPolicy):
    """Least recently used. The least recently used block is at the front of ``_order``;
    inserting or accessing a block moves it to the back."""

    def __init__(self, info=None) -> None:
        super().__init__(info)
        self._order: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def on_insert(self, blocks) -> None:
        self._order.update(dict.fromkeys(inserted_ids(blocks, self.name)))  # new keys go to the back, in order

    def on_access(self, blocks) -> None:
        move = self._order.move_to_end
        for b in accessed_ids(blocks, self._order, self.name):
            move(b)

    def on_remove(self, blocks) -> None:
        pop = self._order.pop
        for b in as_block_list(blocks):
            pop(b, None)

    def victims(self, n: int, protected=None) -> np.ndarray:
        return first_unprotected(self._order, n, protected)

