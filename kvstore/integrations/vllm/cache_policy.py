"""CachePolicy adapters: every online kvstore eviction policy behind vLLM's OffloadingConnector ``CachePolicy``."""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache

import numpy as np
from vllm.v1.kv_offload.base import OffloadKey, ReqContext
from vllm.v1.kv_offload.cpu.policies.base import CachePolicy, ChunkStatus

from kvstore.errors import ConfigError
from kvstore.evict import POLICIES, BlockInfo, make_policy
from kvstore.evict.base import PrefixTree
from kvstore.evict.cost import CostModel


class KVStoreCachePolicy(CachePolicy):
    """A kvstore eviction policy behind vLLM's ``CachePolicy`` interface.

    Chunks get dense integer ids (recycled); the kvstore policy sees those ids and a
    :class:`BlockInfo` kept current here: ``position`` is the chunk's end token (from the
    request context), ``recompute_cost`` its recompute FLOPs there, ``reload_cost`` infinite
    (a CPU chunk has no copy below). Chunks that are in use (``ref_cnt != 0``) or protected
    are never victims. Subclasses (see :func:`cache_policy_class`) fix the policy name.

    vLLM's offloading lookup, like the connector's, loads a prefix only up to its first missing
    chunk, so the adapter keeps the prefix tree of its chunks and evicts from its leaves only (as
    the connector's host tier does; a cost-aware policy would otherwise take a prefix's cheap head
    and strand the rest). Links are learned from the head-to-tail key lists vLLM passes with a
    request context: consecutive keys whose positions both are known and increase.
    """

    policy_name: str = ""

    def __init__(self, cache_capacity: int) -> None:
        super().__init__(cache_capacity)
        self.info = BlockInfo(max(16, cache_capacity))
        self.policy = make_policy(self.policy_name, self.info)
        self.cost = CostModel.preset("llama3-8b")
        self.chunks: dict[OffloadKey, ChunkStatus] = {}
        self._id: dict[OffloadKey, int] = {}
        self._key: dict[int, OffloadKey] = {}
        self._free: list[int] = []
        self._positions: dict[OffloadKey, int] = {}
        self._busy: set[int] = set()  # ids of chunks with ref_cnt != 0 (being written or read)
        self._clock = 0
        self._parent_key: dict[OffloadKey, OffloadKey] = {}  # chunk -> the chunk it extends
        self._tree = PrefixTree(self.info.capacity)  # by id: which resident chunk each chunk extends

    def get(self, key: OffloadKey) -> ChunkStatus | None:
        return self.chunks.get(key)

    def insert(self, key: OffloadKey, chunk: ChunkStatus) -> None:
        bid = self._free.pop() if self._free else len(self._id)
        self.info.reserve(bid + 1)
        self._tree.grow(self.info.capacity)
        self.chunks[key], self._id[key], self._key[bid] = chunk, bid, key
        parent = self._id.get(self._parent_key.get(key))
        if parent is not None:
            self._tree.link([bid], [parent])
        self.info.link([bid], [-1 if parent is None else parent])
        pos = self._positions.pop(key, 0)
        self._clock += 1
        info = self.info
        info.position[bid], info.num_tokens[bid], info.last_access[bid], info.access_count[bid] = pos, 1, self._clock, 1
        info.reads[bid] = 1
        info.recompute_cost[bid] = float(self.cost.recompute_flops(pos, 1))
        info.reload_cost[bid] = np.inf
        info.tier[bid] = BlockInfo.TIER_HOST
        if chunk.ref_cnt != 0:
            self._busy.add(bid)
        self.policy.on_insert([bid])

    def remove(self, key: OffloadKey) -> None:
        del self.chunks[key]
        bid = self._id.pop(key)
        del self._key[bid]
        self._busy.discard(bid)
        self._parent_key.pop(key, None)
        self._tree.unlink([bid])
        self.policy.on_remove([bid])
        self.info.reset(np.asarray([bid]))
        self._free.append(bid)

    def _note_positions(self, keys: Iterable[OffloadKey], req_context: ReqContext) -> list[OffloadKey]:
        """Record the positions of ``keys`` (head to tail) and the links between consecutive ones."""
        keys = list(keys)
        prev_key, prev_pos = None, None
        for k in keys:
            pos = req_context.get_offload_key_position(k)
            if pos is not None:
                self._positions[k] = pos
                if prev_pos is not None and prev_pos < pos:
                    self._parent_key[k] = prev_key
                    child, parent = self._id.get(k), self._id.get(prev_key)
                    if child is not None and parent is not None and self._tree.parent[child] == -1:
                        self._tree.link([child], [parent])
                        self.info.parent[child] = parent
                        self.info.fanout[parent] += 1
            prev_key, prev_pos = k, pos
        return keys

    def on_store_miss(self, keys: Iterable[OffloadKey], req_context: ReqContext) -> None:
        self._note_positions(keys, req_context)

    def touch(self, keys: Iterable[OffloadKey], req_context: ReqContext) -> None:
        # vLLM passes a request's keys head to tail; as vLLM's own LRU does, the head is read last
        # (most recent), so recency evicts a prefix from its tail and never strands the rest.
        ids = [self._id[k] for k in reversed(self._note_positions(keys, req_context)) if k in self._id]
        if ids:
            self._clock += 1
            self.info.last_access[ids] = self._clock
            self.info.access_count[ids] += 1
            self.info.reads[ids] += 1
            self.policy.on_access(ids)

    def evict(self, n: int, protected: set[OffloadKey]) -> list[tuple[OffloadKey, ChunkStatus]] | None:
        if n == 0:
            return []
        skip = np.zeros(self.info.capacity, dtype=np.bool_)
        skip[list(self._busy.union(self._id[k] for k in protected if k in self._id))] = True
        chosen = self._tree.victims(self.policy, n, skip)  # named, not removed
        if chosen.size < n:
            return None  # nothing removed: atomic
        out = [(self._key[b], self.chunks[self._key[b]]) for b in chosen.tolist()]
        for key, _ in out:
            self.remove(key)
        return out

    def mark_evictable(self, key: OffloadKey) -> None:
        self._busy.discard(self._id[key])

    def mark_non_evictable(self, key: OffloadKey) -> None:
        self._busy.add(self._id[key])

    def clear(self) -> None:
        for key in list(self.chunks):
            self.remove(key)
        self._positions.clear()
        self._parent_key.clear()


@cache
def cache_policy_class(policy: str) -> type[KVStoreCachePolicy]:
    """The vLLM ``CachePolicy`` class of kvstore policy ``policy`` (one class per name)."""
    cls = POLICIES.get(policy)
    if cls is None or cls.offline:
        online = sorted(n for n, c in POLICIES.items() if not c.offline)
        raise ConfigError(f"no online kvstore eviction policy {policy!r}; known: {online}")
    name = f"kvstore_{policy}"
    return type(name, (KVStoreCachePolicy,), {"policy_name": policy, "__module__": "kvstore.integrations.vllm", "__qualname__": name})
