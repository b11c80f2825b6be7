"""FIFO: evict the block that entered the tier first; accesses change nothing."""

from __future__ import annotations

from kvstore.evict.base import accessed_ids, register_policy
from kvstore.evict.lru import LRU


@register_policy("fifo")
class FIFO(LRU):
    """First in, first out: LRU's insertion-ordered queue (the oldest insertion at the front)
    without its move-to-back on access."""

    def on_access(self, blocks) -> None:
        accessed_ids(blocks, self._order, self.name)  # checked like every policy's, then no change
