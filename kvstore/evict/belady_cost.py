"""belady-cost: the cost-aware offline reference (replay only)."""

from __future__ import annotations

import numpy as np

from kvstore.errors import ConfigError
from kvstore.evict.base import OfflinePolicy, accessed_ids, as_block_array, inserted_ids, protected_at, register_policy


@register_policy("belady-cost")
class BeladyCost(OfflinePolicy):
    """Offline cost-aware eviction: evict the block whose next read is farthest away *per unit
    of miss cost*, i.e. the largest ``(next_use - now) / c_b`` (never-read-again blocks first).

    ``c_b = min(recompute_cost / compute_throughput, reload_cost)`` is what a miss on the block
    costs (the same price asym uses). Keeping a block for ``d`` more reads buys at most ``c_b``:
    this greedy spends cache time where it saves the most cost per read of occupancy. It is
    the recompute-cost analogue of libCacheSim's BeladySize, a reference that online
    policies' recompute is compared against; minimum-cost caching is a min-cost-flow
    problem, and this greedy is not proven optimal for it.

    The score depends on ``now``, so ``victims`` rescores every resident block (O(resident)
    numpy work per call): fine for an offline bound, not a policy for a live store.
    """

    def __init__(self, info=None, *, compute_throughput: float = 400e12) -> None:
        if info is None:
            raise ConfigError("belady-cost needs a BlockInfo (it reads last_access and the costs)")
        if not compute_throughput > 0:
            raise ConfigError(f"belady-cost compute_throughput must be > 0 FLOP/s, got {compute_throughput!r}")
        super().__init__(info)
        self._inv_tput = 1.0 / compute_throughput
        self._next: np.ndarray | None = None
        self._ids = np.zeros(0, dtype=np.int64)  # resident blocks in [:_n]
        self._slot: dict[int, int] = {}  # block -> its index in _ids
        self._n = 0
        self._now = 0

    def prepare(self, trace) -> None:
        self._next = trace.next_use()

    def __len__(self) -> int:
        return self._n

    def _see(self, blocks: np.ndarray) -> None:
        if blocks.size:
            self._now = max(self._now, int(self.info.last_access[blocks].max()))

    def on_insert(self, blocks) -> None:
        arr = np.array(inserted_ids(blocks, self.name), dtype=np.int64)
        if self._n + arr.size > self._ids.size:
            grown = np.zeros(max(2 * self._ids.size, self._n + arr.size, 64), dtype=np.int64)
            grown[: self._n] = self._ids[: self._n]
            self._ids = grown
        for b in arr.tolist():
            self._slot[b] = self._n
            self._ids[self._n] = b
            self._n += 1
        self._see(arr)

    def on_access(self, blocks) -> None:
        self._see(np.array(accessed_ids(blocks, self._slot, self.name), dtype=np.int64))

    def on_remove(self, blocks) -> None:
        ids, slot = self._ids, self._slot
        for b in as_block_array(blocks).tolist():
            i = slot.pop(b, None)
            if i is None:
                continue
            self._n -= 1
            last = int(ids[self._n])
            if last != b:
                ids[i] = last
                slot[last] = i

    def victims(self, n: int, protected=None) -> np.ndarray:
        if self._next is None:
            raise ConfigError("belady-cost is offline: call prepare(trace) before replaying")
        ids = self._ids[: self._n]
        if protected is not None:
            ids = ids[~protected_at(ids, protected)]
        if n <= 0 or ids.size == 0:
            return np.zeros(0, dtype=np.int64)
        info = self.info
        nxt = self._next[info.last_access[ids]]
        cost = np.minimum(info.recompute_cost[ids] * self._inv_tput, info.reload_cost[ids])
        score = np.where(nxt >= self._next.size, np.inf, (nxt - self._now) / np.maximum(cost, 1e-300))
        if n < ids.size:
            top = np.argpartition(-score, n - 1)[:n]
        else:
            top = np.arange(ids.size)
        top = top[np.argsort(-score[top], kind="stable")]
        return ids[top].astype(np.int64)
