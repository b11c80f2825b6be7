"""Priority policies: evict the resident block with the smallest priority (a lazy min-heap).

LFU, GDSF, asym and Belady differ only in how they score a block when it is inserted or
accessed; this base keeps the order. A block's current entry is ``(priority, tick, block)``;
``tick`` grows with every scoring, so the order is total: equal priorities evict the older
scoring first. The current entries live in numpy arrays indexed by block id (``_prio``,
``_stamp``, ``_live``), so scoring a batch is a few vectorised writes; the heap holds tuples.

Invariants (``pushed[b]``: the tick of the newest entry pushed for ``b``, -1 once ``b`` left):

- Every live block has an entry in ``_heap``, ``_pending`` or ``_lent`` that is no larger
  than its current entry; when ``pushed[b] == stamp[b]`` that entry *is* the current one.
- Scoring writes the arrays. An insertion, or an access that *lowers* a block's priority
  (Belady's next use), appends the new entry to ``_pending``. An access that raises it (LFU,
  GDSF and asym always do: counts and the aging clock only grow) pushes nothing: the block's
  older, smaller entry stays in the heap as a lower bound, and when it surfaces in
  ``victims`` the current entry is pushed in its place. A prefix that every request reads is
  re-scored thousands of times between two evictions and costs no heap work at all.
- ``victims`` moves the pending entries into the heap (one push each when they are few, else
  ``_compact`` rebuilds the heap from the arrays in one ``heapify``) and pops. An entry whose
  block left, or that is not its block's newest pushed entry, is dropped; a stale newest one
  is replaced by the current entry; a current one names a victim (unless protected).
- Many victims at once (``n >= 64`` and at least 1/64 of the live blocks: a batch of saves
  into a full tier), or victims among mostly protected blocks (a mask over 1/8 of them or
  more: a prefix tree whose inner blocks are protected), are chosen by a partial sort of the
  arrays instead; that drops the heap
  (``_heap is None``, scoring pushes nothing) until the next heap ``victims`` rebuilds it.
- Entries that ``victims`` named are kept in ``_lent`` and pushed back (as the block's
  current entry) at the next ``victims`` unless the block left meanwhile, so naming a victim
  costs one pop and removing it costs nothing more.

Why the order is exact: every heap entry is at most its block's current entry, so when the
smallest entry is current, it is the smallest current entry of all.
"""

from __future__ import annotations

import heapq
from abc import abstractmethod
from collections import deque
from functools import partial

import numpy as np

from kvstore.errors import BlockStateError, OutOfRangeError
from kvstore.evict.base import EvictionPolicy, is_protection_mask, as_block_array, protected_at, protected_ids

Entry = tuple[float, int, int]


def _distinct(ids: np.ndarray) -> int:
    """How many distinct ids ``ids`` (non-empty) holds (a set: cheaper than np.unique when short)."""
    return len(set(ids.tolist())) if ids.size > 1 else 1


class PriorityPolicy(EvictionPolicy):
    """Base of policies that evict the smallest priority first; subclasses define :meth:`priority`."""

    #: per-block arrays (name -> dtype, fill), grown together as block ids appear
    _ARRAYS: dict[str, tuple[type, object]] = {
        "_prio": (np.float64, 0.0),
        "_stamp": (np.int64, -1),
        "_pushed": (np.int64, -1),
        "_live": (np.bool_, False),
    }

    #: ``victims(n)`` sorts the arrays instead of popping the heap from this ``n`` up (when
    #: ``n`` is also at least 1/64 of the live blocks)
    sort_victims_at = 64

    def __init__(self, info=None) -> None:
        super().__init__(info)
        for name, (dtype, fill) in self._ARRAYS.items():
            setattr(self, name, np.full(0, fill, dtype=dtype))
        self._num_live = 0
        self._heap: list[Entry] | None = []  # None: not kept (see _victims_by_sort)
        self._pending: list[Entry] = []
        self._lent: list[Entry] = []
        self._tick = 0

    @abstractmethod
    def priority(self, blocks: np.ndarray, hit: bool) -> np.ndarray | list[float]:
        """Priorities of ``blocks`` (``[n]`` int64) just inserted (``hit=False``) or accessed
        (``hit=True``), in order: ``[n]`` floats, smallest evicted first."""

    def __len__(self) -> int:
        return self._num_live

    def __contains__(self, block: int) -> bool:
        return 0 <= block < self._live.size and bool(self._live[block])

    def key(self, block: int) -> float:
        """Current priority of resident ``block``."""
        if block not in self:
            raise KeyError(block)
        return float(self._prio[block])

    def _reserve(self, top: int) -> None:
        """Grow the per-block arrays to hold block id ``top`` (amortised doubling)."""
        size = self._live.size
        if top < size:
            return
        cap = max(top + 1, 2 * size, 1024)
        for name, (dtype, fill) in self._ARRAYS.items():
            old = getattr(self, name)
            new = np.full(cap, fill, dtype=dtype)
            new[:size] = old
            setattr(self, name, new)

    def on_insert(self, blocks) -> None:
        arr = as_block_array(blocks)
        if arr.size and arr.min() < 0:
            raise OutOfRangeError(f"{self.name}: block id {int(arr.min())} is negative")
        self._score(arr, hit=False)

    def on_access(self, blocks) -> None:
        arr = as_block_array(blocks)
        if arr.size:
            live = self._live
            known = (arr >= 0) & (arr < live.size)
            if not known.all() or not live[arr].all():
                bad = arr[~known] if not known.all() else arr[~live[arr]]
                raise BlockStateError(f"{self.name}: on_access of block {int(bad[0])}, which this tier does not hold")
        self._score(arr, hit=True)

    def on_remove(self, blocks) -> None:
        arr = as_block_array(blocks)
        arr = arr[arr < self._live.size]
        gone = arr[self._live[arr]]
        if gone.size:
            self._live[gone] = False
            self._pushed[gone] = -1  # every entry of a removed block is stale
            self._num_live -= _distinct(gone)
            self._removed(gone)

    def _removed(self, gone: np.ndarray) -> None:
        """Hook: ``gone`` (block ids, maybe repeated) just left; ``_prio`` still holds their priority."""

    def _score(self, arr: np.ndarray, hit: bool) -> None:
        n = arr.size
        if n == 0:
            return
        try:
            live = self._live[arr]
        except IndexError:  # a block id past the arrays: grow them
            self._reserve(int(arr.max()))
            live = self._live[arr]
        prio = np.asarray(self.priority(arr, hit), dtype=np.float64)
        ticks = np.arange(self._tick + 1, self._tick + 1 + n, dtype=np.int64)
        self._tick += n
        # an insertion, or a priority that went down, needs a heap entry now (see the docstring)
        all_live = bool(live.all())
        if hit:
            eager = prio < self._prio[arr]
            if not all_live:
                eager |= ~live
        self._prio[arr] = prio
        self._stamp[arr] = ticks
        if not all_live:
            fresh = arr[~live]
            self._num_live += _distinct(fresh)
            self._live[fresh] = True
        if self._heap is None:
            return  # no heap kept: the next heap victims rebuilds it from the arrays
        if hit:  # an insertion pushes every entry (re-inserting a resident block may lower it)
            if not eager.any():
                return
            if not eager.all():
                arr, prio, ticks = arr[eager], prio[eager], ticks[eager]
        self._pushed[arr] = ticks
        self._pending += zip(prio.tolist(), ticks.tolist(), arr.tolist())
        if len(self._heap) + len(self._pending) > 2 * self._num_live + 4096:
            self._compact()

    def _current(self, b: int) -> Entry:
        """Push ``b``'s current entry (its newest pushed entry was stale or lent) and return it."""
        t = int(self._stamp[b])
        self._pushed[b] = t
        return (float(self._prio[b]), t, b)

    def victims(self, n: int, protected=None) -> np.ndarray:
        if (n >= self.sort_victims_at and 64 * n >= self._num_live) or self._mostly_protected(protected):
            return self._victims_by_sort(n, protected)
        if self._heap is None or 8 * len(self._pending) > self._num_live:  # one O(live) heapify beats that many O(log) pushes
            self._compact()
        heap, stamp, pushed = self._heap, self._stamp, self._pushed
        push = heapq.heappush
        if self._pending:
            deque(map(partial(push, heap), self._pending), maxlen=0)
            self._pending = []
        if self._lent:
            for e in self._lent:
                b = e[2]
                if pushed[b] == e[1]:
                    push(heap, self._current(b))
            self._lent = []
        if n <= 0:
            return np.zeros(0, dtype=np.int64)
        out: list[int] = []
        lent = self._lent
        skip = protected_ids(protected)
        pop = heapq.heappop
        while heap:
            e = pop(heap)
            b, t = e[2], e[1]
            if pushed[b] != t:
                continue  # the block left (pushed = -1), or a newer entry of it is in the heap
            if stamp[b] != t:
                push(heap, self._current(b))  # re-scored since: its current entry takes this one's place
                continue
            lent.append(e)
            if b not in skip:
                out.append(b)
                if len(out) == n:
                    break
        return np.asarray(out, dtype=np.int64)

    def _mostly_protected(self, protected) -> bool:
        """A protection mask covering at least 1/8 of the live blocks (the owner protects every
        inner block of a prefix tree, say): popping would wade through protected entries, and
        re-push each at every call."""
        return is_protection_mask(protected) and 8 * int(np.count_nonzero(protected)) >= self._num_live > 0

    def _victims_by_sort(self, n: int, protected) -> np.ndarray:
        """The ``n`` smallest current entries by a partial sort of the arrays: O(ids), no heap
        work. For many victims at once (a batch of saves into a full tier), where popping would
        surface and re-push the stale entry of every block read since. The heap is dropped and
        rebuilt by the next heap ``victims`` (scoring pushes nothing meanwhile)."""
        ids = np.flatnonzero(self._live)
        if protected is not None:
            ids = ids[~protected_at(ids, protected)]
        if ids.size > n:
            prio = self._prio[ids]
            ids = ids[prio <= np.partition(prio, n - 1)[n - 1]]
        order = np.lexsort((self._stamp[ids], self._prio[ids]))[:n]
        self._heap = None
        self._pending = []
        self._lent = []
        return ids[order]

    def _compact(self) -> None:
        """Rebuild the heap from the arrays: merges the pending entries and drops the stale ones."""
        ids = np.flatnonzero(self._live)
        ticks = self._stamp[ids]
        self._pushed[ids] = ticks
        self._heap = list(zip(self._prio[ids].tolist(), ticks.tolist(), ids.tolist()))
        heapq.heapify(self._heap)
        self._pending = []
        self._lent = []


class GreedyDual(PriorityPolicy):
    """Greedy-Dual aging (Young 1994): scores are ``clock + credit`` and evicting a block raises
    ``clock`` to its score, so a block not read for a while falls below freshly scored ones.
    Subclasses score with :attr:`clock` plus their credit.

    Only an eviction ages: the removal of a block this policy named as a victim (``_named``,
    set by :meth:`victims`, cleared when the block is scored again or leaves). Frees, tier
    moves and invalidations remove blocks the policy did not choose; raising the clock on
    those would let one freed hot block push every resident one below fresh single-use blocks.
    """

    _ARRAYS = {**PriorityPolicy._ARRAYS, "_named": (np.bool_, False)}

    def __init__(self, info=None) -> None:
        super().__init__(info)
        self.clock = 0.0

    def _score(self, arr: np.ndarray, hit: bool) -> None:
        super()._score(arr, hit)
        if arr.size:
            self._named[arr] = False

    def victims(self, n: int, protected=None) -> np.ndarray:
        out = super().victims(n, protected)
        self._named[out] = True
        return out

    def _removed(self, gone: np.ndarray) -> None:
        evicted = gone[self._named[gone]]
        if evicted.size:
            self.clock = max(self.clock, float(self._prio[evicted].max()))
        self._named[gone] = False
