"""Priority policies: evict the resident block with the smallest priority (a lazy min-heap).

LFU, GDSF, asym and the offline bounds differ only in how they score a block when it is
inserted or accessed; this base keeps the order. Invariants:

- ``_live[b]`` is the entry ``(priority, tick, b)`` of every resident block ``b``; ``tick``
  grows with every scoring, so equal priorities evict the older scoring first.
- ``_heap`` holds one float per scoring and ``_bucket[k]`` the entry scored ``k`` (a deque of
  them, oldest first, when several share ``k``): the heap compares floats only, several
  times faster than tuples. An entry
  whose block maps to a different object in ``_live`` is stale and dropped when it surfaces.
- Entries that ``victims`` popped are kept in ``_lent`` and restored at the next ``victims``
  unless the block was removed or re-scored meanwhile, so naming a victim costs one pop and
  removing it costs nothing more.
"""

from __future__ import annotations

import heapq
from abc import abstractmethod
from collections import deque

import numpy as np

from kvstore.evict.base import EvictionPolicy, as_block_array, as_block_list

Entry = tuple[float, int, int]


class PriorityPolicy(EvictionPolicy):
    """Base of policies that evict the smallest priority first; subclasses define :meth:`priority`."""

    def __init__(self, info=None) -> None:
        super().__init__(info)
        self._live: dict[int, Entry] = {}
        self._heap: list[float] = []
        self._bucket: dict[float, Entry | deque[Entry]] = {}
        self._lent: list[Entry] = []
        self._tick = 0

    @abstractmethod
    def priority(self, blocks: np.ndarray, hit: bool) -> np.ndarray | list[float]:
        """Priorities of ``blocks`` (``[n]`` int64) just inserted (``hit=False``) or accessed
        (``hit=True``), in order: ``[n]`` floats, smallest evicted first."""

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, block: int) -> bool:
        return block in self._live

    def key(self, block: int) -> float:
        """Current priority of resident ``block``."""
        return self._live[block][0]

    def on_insert(self, blocks) -> None:
        self._push(blocks, hit=False)

    def on_access(self, blocks) -> None:
        self._push(blocks, hit=True)

    def on_remove(self, blocks) -> None:
        pop = self._live.pop
        for b in as_block_list(blocks):
            pop(b, None)

    def _push(self, blocks, hit: bool) -> None:
        arr = as_block_array(blocks)
        if arr.size == 0:
            return
        prio = self.priority(arr, hit)
        keys = prio.tolist() if isinstance(prio, np.ndarray) else list(map(float, prio))
        live, heap, push, setdefault = self._live, self._heap, heapq.heappush, self._bucket.setdefault
        tick = self._tick
        for k, b in zip(keys, arr.tolist()):
            tick += 1
            e = live[b] = (k, tick, b)
            q = setdefault(k, e)
            if q is not e:
                if type(q) is tuple:
                    self._bucket[k] = deque((q, e))
                else:
                    q.append(e)
            push(heap, k)
        self._tick = tick
        if len(heap) > 2 * len(live) + 4096:
            self._compact()

    def victims(self, n: int, protected=None) -> np.ndarray:
        live, heap, bucket = self._live, self._heap, self._bucket
        get = live.get
        if self._lent:
            for e in self._lent:
                if get(e[2]) is e:
                    self._restore(e)
            self._lent = []
        out: list[int] = []
        if n <= 0:
            return np.zeros(0, dtype=np.int64)
        lent = self._lent
        skip = set(as_block_list(protected)) if protected is not None else ()
        pop, take = heapq.heappop, bucket.pop
        while heap:
            k = pop(heap)
            e = take(k)
            if type(e) is not tuple:  # several entries share k: take the oldest
                q, e = e, e.popleft()
                if q:
                    bucket[k] = q
            b = e[2]
            if get(b) is e:
                lent.append(e)
                if b not in skip:
                    out.append(b)
                    if len(out) == n:
                        break
        return np.asarray(out, dtype=np.int64)

    def _restore(self, e: Entry) -> None:
        """Put a lent entry back at the front of its bucket (it is older than the rest)."""
        q = self._bucket.get(e[0])
        if q is None:
            self._bucket[e[0]] = e
        elif type(q) is tuple:
            self._bucket[e[0]] = deque((e, q))
        else:
            q.appendleft(e)
        heapq.heappush(self._heap, e[0])

    def _compact(self) -> None:
        """Drop stale entries (every scoring adds one)."""
        entries = sorted(self._live.values(), key=lambda e: e[1])
        bucket: dict[float, Entry | deque[Entry]] = {}
        for e in entries:
            q = bucket.get(e[0])
            if q is None:
                bucket[e[0]] = e
            elif type(q) is tuple:
                bucket[e[0]] = deque((q, e))
            else:
                q.append(e)
        self._bucket = bucket
        self._heap = [e[0] for e in entries]
        heapq.heapify(self._heap)
        self._lent = []


class GreedyDual(PriorityPolicy):
    """Greedy-Dual aging (Young 1994): scores are ``clock + credit`` and removing a block raises
    ``clock`` to its score, so a block not read for a while falls below freshly scored ones.
    Subclasses score with :attr:`clock` plus their credit."""

    def __init__(self, info=None) -> None:
        super().__init__(info)
        self.clock = 0.0

    def on_remove(self, blocks) -> None:
        pop, clock = self._live.pop, self.clock
        for b in as_block_list(blocks):
            e = pop(b, None)
            if e is not None and e[0] > clock:
                clock = e[0]
        self.clock = clock
