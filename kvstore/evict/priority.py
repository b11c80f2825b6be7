"""Priority policies: evict the resident block with the smallest priority (a lazy min-heap).

LFU, GDSF, asym and the offline bounds differ only in how they score a block when it is
inserted or accessed; this base keeps the order. Invariants:

- ``_live[b]`` is the entry ``(priority, tick, b)`` of every resident block ``b``; ``tick``
  grows with every scoring, so the order is ``(priority, tick)``: equal priorities evict the
  older scoring first. Entries are unique (ticks are), so the order is total.
- Every entry of ``_live`` is in ``_heap``, ``_pending`` or ``_lent``. An entry there whose
  block maps to a different object in ``_live`` (re-scored or removed since) is stale and
  dropped when it surfaces.
- Scoring appends entries to ``_pending`` (in C: ``zip``, ``dict.update``, ``list.extend``; no
  Python bytecode runs per block), so the heap work waits for ``victims``, which first moves
  them into the heap: one push each when they are few, else ``_compact`` rebuilds the heap
  from ``_live`` in one ``heapify``, dropping every stale entry (a shared prefix that every
  request reads is re-scored many times between two evictions). ``_compact`` also runs when
  stale and pending entries outnumber live ones.
- Entries that ``victims`` popped are kept in ``_lent`` and pushed back at the next
  ``victims`` unless the block was removed or re-scored meanwhile, so naming a victim costs
  one pop and removing it costs nothing more.

Where an entry waits changes when it is compared, never the order: entries are unique
``(priority, tick, block)`` tuples and the victims are always the smallest live ones.
"""

from __future__ import annotations

import heapq
from abc import abstractmethod
from collections import deque
from functools import partial

import numpy as np

from kvstore.evict.base import EvictionPolicy, as_block_array, as_block_list, protected_ids

Entry = tuple[float, int, int]


class PriorityPolicy(EvictionPolicy):
    """Base of policies that evict the smallest priority first; subclasses define :meth:`priority`."""

    def __init__(self, info=None) -> None:
        super().__init__(info)
        self._live: dict[int, Entry] = {}
        self._heap: list[Entry] = []
        self._pending: list[Entry] = []
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
        n = arr.size
        if n == 0:
            return
        prio = self.priority(arr, hit)
        keys = prio.tolist() if isinstance(prio, np.ndarray) else list(map(float, prio))
        ids = arr.tolist()
        tick = self._tick
        entries = list(zip(keys, range(tick + 1, tick + 1 + n), ids))
        self._tick = tick + n
        self._live.update(zip(ids, entries))
        self._pending += entries
        if len(self._heap) + len(self._pending) > 2 * len(self._live) + 4096:
            self._compact()

    def victims(self, n: int, protected=None) -> np.ndarray:
        if 8 * len(self._pending) > len(self._live):  # one O(live) heapify beats that many O(log) pushes
            self._compact()
        live, heap = self._live, self._heap
        get = live.get
        if self._pending:
            deque(map(partial(heapq.heappush, heap), self._pending), maxlen=0)
            self._pending = []
        if self._lent:
            push = heapq.heappush
            for e in self._lent:
                if get(e[2]) is e:
                    push(heap, e)
            self._lent = []
        if n <= 0:
            return np.zeros(0, dtype=np.int64)
        out: list[int] = []
        lent = self._lent
        skip = protected_ids(protected)
        pop = heapq.heappop
        while heap:
            e = pop(heap)
            b = e[2]
            if get(b) is e:
                lent.append(e)
                if b not in skip:
                    out.append(b)
                    if len(out) == n:
                        break
        return np.asarray(out, dtype=np.int64)

    def _compact(self) -> None:
        """Rebuild the heap from ``_live``: merges the pending entries and drops the stale ones."""
        self._heap = list(self._live.values())
        heapq.heapify(self._heap)
        self._pending = []
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
