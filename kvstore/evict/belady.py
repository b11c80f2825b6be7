"""Belady (MIN): evict the block whose next use is farthest in the future. Offline (replay only)."""

from __future__ import annotations

import numpy as np

from kvstore.errors import ConfigError
from kvstore.evict.base import OfflinePolicy, register_policy
from kvstore.evict.priority import PriorityPolicy


@register_policy("belady")
class Belady(PriorityPolicy, OfflinePolicy):
    """Belady's MIN: the block read again farthest in the future (or never) goes first.

    With uniform block sizes this maximises the block hit count of any policy that evicts only
    to make room (the hit-ratio bound). Priority = ``-next_use`` of the read that inserted or
    last accessed the block, looked up through ``info.last_access`` (the replay simulator keeps
    it equal to the index of that read in ``trace.blocks``).
    """

    def __init__(self, info=None) -> None:
        if info is None:
            raise ConfigError("belady needs a BlockInfo (it reads last_access)")
        super().__init__(info)
        self._next: np.ndarray | None = None

    def prepare(self, trace) -> None:
        self._next = trace.next_use()

    def priority(self, blocks: np.ndarray, hit: bool) -> np.ndarray:
        if self._next is None:
            raise ConfigError("belady is offline: call prepare(trace) before replaying")
        return -self._next[self.info.last_access[blocks]].astype(np.float64)
