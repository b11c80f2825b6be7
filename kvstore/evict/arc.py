"""ARC: Adaptive Replacement Cache (Megiddo & Modha, FAST'03)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from kvstore.evict.base import EvictionPolicy, as_block_list, protected_ids, register_policy, accessed_ids, inserted_ids


@register_policy("arc")
class ARC(EvictionPolicy):
    """Adaptive Replacement Cache.

    ``T1`` holds blocks read once since they entered the tier, ``T2`` blocks read again; both
    are LRU queues (least recent at the front). The ghosts ``B1`` / ``B2`` remember blocks
    recently evicted from each. A block re-inserted from ``B1`` means recency deserved more
    room: the target size ``p`` of ``T1`` grows; one from ``B2`` shrinks it. Victims come from
    the front of ``T1`` while ``|T1| > p``, else from ``T2``. The capacity ``c`` (which bounds
    ``p`` and the ghosts) is the most blocks ever resident, so the policy needs no size.

    The ghosts keep the paper's directory bounds, ``|T1| + |B1| <= c`` and
    ``|T1| + |T2| + |B1| + |B2| <= 2c``, restored after each insertion by dropping the oldest
    ghosts of ``B1``, then of ``B2``: the same ghosts the paper drops on a miss.

    One difference from the paper (and from libCacheSim) is the protocol's: ``victims`` is asked
    before the policy learns which block comes in, so a ghost hit adapts ``p`` at
    ``on_insert``, after the victim was chosen, and the paper's tie rule (at ``|T1| == p``
    evict from ``T1`` when the block comes from ``B2``) has no block to test.
    tests/evict/test_libcachesim.py checks both variants against a reference, and libCacheSim.
    """

    def __init__(self, info=None) -> None:
        super().__init__(info)
        self._t1: OrderedDict[int, None] = OrderedDict()
        self._t2: OrderedDict[int, None] = OrderedDict()
        self._b1: OrderedDict[int, None] = OrderedDict()
        self._b2: OrderedDict[int, None] = OrderedDict()
        self._p = 0.0
        self._c = 0

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    def on_insert(self, blocks) -> None:
        t1, t2, b1, b2 = self._t1, self._t2, self._b1, self._b2
        for b in inserted_ids(blocks, self.name):
            if b in b1:
                self._p = min(float(self._c), self._p + max(len(b2) / len(b1), 1.0))
                del b1[b]
                t2[b] = None
            elif b in b2:
                self._p = max(0.0, self._p - max(len(b1) / len(b2), 1.0))
                del b2[b]
                t2[b] = None
            else:
                t1[b] = None
        c = self._c = max(self._c, len(t1) + len(t2))
        while b1 and len(t1) + len(b1) > c:
            b1.popitem(last=False)
        while b2 and len(t1) + len(t2) + len(b1) + len(b2) > 2 * c:
            b2.popitem(last=False)

    def on_access(self, blocks) -> None:
        t1, t2 = self._t1, self._t2
        for b in accessed_ids(blocks, (t1, t2), self.name):
            if t1.pop(b, 0) is None:  # was in T1: now seen twice
                t2[b] = None
            else:
                t2.move_to_end(b)

    def on_remove(self, blocks) -> None:
        t1, t2, b1, b2 = self._t1, self._t2, self._b1, self._b2
        for b in as_block_list(blocks):
            if t1.pop(b, 0) is None:
                b1[b] = None
            elif t2.pop(b, 0) is None:
                b2[b] = None

    def victims(self, n: int, protected=None) -> np.ndarray:
        skip = protected_ids(protected)
        first = (b for b in self._t1 if b not in skip)
        second = (b for b in self._t2 if b not in skip)
        out: list[int] = []
        left_t1 = len(self._t1)
        while len(out) < n:
            b = next(first, None) if left_t1 > self._p else None
            if b is None:
                b = next(second, None)
                if b is None:
                    b = next(first, None)
                    if b is None:
                        break
            if b in self._t1:
                left_t1 -= 1
            out.append(b)
        return np.asarray(out, dtype=np.int64)
