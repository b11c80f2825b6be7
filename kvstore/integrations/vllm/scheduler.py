"""Scheduler side: the host tier's index (what it holds, its policy, pins) and load/save planning."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice, takewhile
from typing import TYPE_CHECKING, Any

import numpy as np

from kvstore.blocks import BlockPool
from kvstore.errors import CapacityError
from kvstore.evict import BlockInfo, EvictionPolicy, make_policy
from kvstore.evict.base import PrefixTree
from kvstore.evict.cost import CostModel
from kvstore.integrations.lmcache import cold_key
from kvstore.integrations.vllm.config import KVStoreConnectorConfig
from kvstore.integrations.vllm.metadata import BlockCopy, KVStoreConnectorMetadata, KVStoreWorkerMetadata
from kvstore.spec import KVSpec

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


class ColdKeys:
    """The scheduler's view of what the cold tier holds.

    The local disk's keys are mirrored as an LRU capped at its capacity (LMCache evicts LRU
    too; a stale entry only costs a failed load, reported and recomputed). A remote tier is
    shared, so other engines add to it: it is asked at lookup (``remote``: a lookup-only
    :class:`~kvstore.integrations.lmcache.LMCacheRemoteTier`, bounded by its timeout and
    empty while the server is down).

    Args:
        capacity: blocks the local disk holds (0: no disk).
        remote: the remote tier to ask, or None.
    """

    def __init__(self, capacity: int = 0, remote=None) -> None:
        self.capacity = capacity
        self.remote = remote
        self.mirror: OrderedDict[bytes, None] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return bool(self.capacity) or self.remote is not None

    def __len__(self) -> int:
        return len(self.mirror)

    def __contains__(self, key: bytes) -> bool:
        return self.count_leading([key]) == 1

    def add(self, key: bytes) -> None:
        """A host victim spilled to the cold tier."""
        if self.capacity:
            self.mirror[key] = None
            self.mirror.move_to_end(key)
            while len(self.mirror) > self.capacity:
                self.mirror.popitem(last=False)

    def discard(self, key: bytes) -> None:
        """``key`` moved back into the host tier (the disk copy stays, but the host one is read first)."""
        self.mirror.pop(key, None)

    def count_leading(self, keys: Sequence[bytes]) -> int:
        """How many of ``keys``, from the first, the cold tier holds (disk mirror, then the server)."""
        n = len(list(takewhile(self.mirror.__contains__, keys)))
        if self.remote is not None and n < len(keys):
            while n < len(keys):
                start = n
                n += self.remote.count_leading([cold_key(k) for k in keys[n:]])
                n += len(list(takewhile(self.mirror.__contains__, islice(keys, n, None))))
                if n == start:
                    break
        return n

    def clear(self) -> None:
        """Forget the local mirror (a shared server is never cleared by one engine)."""
        self.mirror.clear()

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()


class HostTierIndex:
    """What the host tier holds: key -> slot, the eviction policy, and pins. Holds no KV.

    Block ids seen by the policy are slot numbers (a block lives in one slot). ``pinned``
    (``[num_slots]`` bool) marks the slots that this step's loads read: never victims, and
    handed to the policy as its protection mask as is; so are the slots inserted this step,
    whose saves are not done yet (the scheduler clears the mask once it has built the step's
    metadata). The index keeps the prefix tree of what it holds (``parent``: the slot of the
    block each block extends, from the ``parents`` that ``insert`` is given; ``children``: how
    many cached blocks extend each slot); with ``leaves_only`` it never evicts a block that a
    cached block extends: vLLM loads a prefix only up to its first missing block, so a hole
    would strand everything after it. What the cold tier holds is ``cold``
    (:class:`ColdKeys`): a mirror of the local disk's keys, and/or the shared remote server,
    asked at lookup.

    Args:
        spec: host block shape (for sizes and costs).
        num_slots: host tier capacity in blocks.
        policy: kvstore eviction policy name or instance.
        cost: recompute/reload cost model the policy reads.
        cold_capacity: blocks the local cold tier holds (0: none); ignored when ``cold`` is given.
        leaves_only: evict only blocks that no cached block extends.
        cold: the cold tier's keys (default: a mirror of ``cold_capacity`` keys).
    """

    def __init__(
        self, spec: KVSpec, num_slots: int, policy: str | EvictionPolicy, cost: CostModel, cold_capacity: int = 0,
        *, leaves_only: bool = False, cold: "ColdKeys | None" = None,
    ) -> None:
        self.spec = spec
        self.leaves_only = leaves_only
        self.cost = cost
        self.pool = BlockPool(spec, num_slots, device="meta", name="host")
        self.info = BlockInfo(num_slots)
        self.policy = make_policy(policy, self.info)
        self.slot_of: dict[bytes, int] = {}
        self.key_of: list[bytes | None] = [None] * num_slots
        self.cold = cold if cold is not None else ColdKeys(cold_capacity)
        self.pinned = np.zeros(num_slots, dtype=np.bool_)
        self.tree = PrefixTree(num_slots)  # which cached slot each slot's block extends
        self._clock = 0
        self._block_bytes = spec.bytes_per_block
        self._reload_cost = float(cost.reload_seconds(self._block_bytes)) if self.cold.enabled else np.inf

    def __len__(self) -> int:
        return len(self.slot_of)

    def match(self, keys: Sequence[bytes]) -> tuple[int, int]:
        """Leading keys present: ``(in host or cold, in host only)``. No side effects."""
        slot_of = self.slot_of
        host = n = len(list(takewhile(slot_of.__contains__, keys)))
        while n < len(keys):  # runs of cold keys and host keys, alternating
            start = n
            n += self.cold.count_leading(keys[n:])
            n += len(list(takewhile(slot_of.__contains__, islice(keys, n, None))))
            if n == start:
                break
        return n, host

    def touch(self, slots: Sequence[int] | np.ndarray) -> None:
        """Record an access to resident ``slots`` (``[n]``, prefix order: the last is the most recent)."""
        arr = np.asarray(slots, dtype=np.int64)
        if arr.size == 0:
            return
        self._clock += 1
        self.info.last_access[arr] = self._clock
        self.info.access_count[arr] += 1
        self.info.reads[arr] += 1
        self.policy.on_access(arr)

    def insert(
        self, keys: Sequence[bytes], positions: Sequence[int], parents: Sequence[bytes | None] | None = None,
    ) -> tuple[list[int], list[tuple[int, bytes]]]:
        """Give each key (not resident) a slot, evicting unpinned victims as needed, and pin
        the slots given (the step's copy into them is not done yet).

        Returns ``(slots, evicted)`` with ``evicted`` the ``(slot, key)`` pairs whose content
        must leave (spill to the cold tier) before the slot is overwritten. Inserts as many
        keys as fit (a prefix of ``keys``) when too few slots can be freed. The victims' slots
        go straight to the first keys, in victim order, without a trip through the free list
        (the slots and order a release then allocate would give); the free slots follow.
        ``parents[i]`` is the key of the block ``keys[i]`` extends (None for a first block);
        with ``leaves_only`` a block that a cached block extends is never a victim.
        """
        need = len(keys) - self.pool.num_free
        evicted: list[tuple[int, bytes]] = []
        reused = np.zeros(0, dtype=np.int64)
        if need > 0:
            reused, evicted = self._evict(need)
            for _, k in evicted:
                self.cold.add(k)
            fit = reused.size + self.pool.num_free
            keys, positions = keys[:fit], positions[:fit]
        if not keys:
            return [], evicted
        fresh = len(keys) - reused.size
        slots = np.concatenate([reused, self.pool.allocate(np.zeros(fresh, dtype=np.int64))]) if fresh else reused
        for s, k in zip(slots.tolist(), keys):
            self.slot_of[k] = s
            self.key_of[s] = k
            self.cold.discard(k)
        if parents is not None:
            get = self.slot_of.get
            self.tree.link(slots, [-1 if k is None else get(k, -1) for k in parents[: slots.size]])
        info, pos = self.info, np.asarray(positions, dtype=np.int64)
        self._clock += 1
        info.position[slots] = pos
        info.num_tokens[slots] = self.spec.block_size
        info.size_bytes[slots] = self._block_bytes
        info.tier[slots] = BlockInfo.TIER_HOST
        info.last_access[slots] = self._clock
        info.link(slots, self.tree.parent[slots])  # fan-out and reads count from this content's insertion
        info.access_count[slots] = 1
        info.reads[slots] = 1
        info.recompute_cost[slots] = self.cost.recompute_flops(pos, self.spec.block_size)
        info.reload_cost[slots] = self._reload_cost
        self.pool.owner[slots] = slots
        self.pinned[slots] = True  # written this step: no later insert of the step may take them
        self.policy.on_insert(slots)
        return slots.tolist(), evicted

    @property
    def parent(self) -> np.ndarray:
        """``[num_slots]`` the cached slot each slot's block extends (-1: none)."""
        return self.tree.parent

    @property
    def children(self) -> np.ndarray:
        """``[num_slots]`` how many cached blocks extend each slot."""
        return self.tree.children

    def _evict(self, n: int) -> tuple[np.ndarray, list[tuple[int, bytes]]]:
        """Up to ``n`` unpinned victims, forgotten: ``(slots, [(slot, key), ...])`` in victim order.
        With ``leaves_only`` each round takes the current leaves only; evicting a leaf can make
        its parent one, so rounds repeat until ``n`` are found or no leaf is left to take."""
        evicted: list[tuple[int, bytes]] = []

        def take(got: np.ndarray) -> None:
            evicted.extend((s, self.key_of[s]) for s in got.tolist())
            self._forget(got)

        if self.leaves_only:
            return self.tree.victims(self.policy, n, self.pinned, take), evicted
        got = self.policy.victims(n, self.pinned)
        take(got)
        return got, evicted

    def remove(self, slots: Iterable[int]) -> None:
        """Forget ``slots`` (their content is lost)."""
        live = np.asarray([s for s in slots if self.key_of[s] is not None], dtype=np.int64)
        if live.size:
            self._forget(live)
            self.info.reset(live)
            self.pool.release(live)

    def _forget(self, slots: np.ndarray) -> None:
        """Unmap the keys of ``slots``, unlink them from the prefix tree and tell the policy they
        left (the slots stay allocated)."""
        self.policy.on_remove(slots)
        for s in slots.tolist():
            del self.slot_of[self.key_of[s]]
            self.key_of[s] = None
        self.tree.unlink(slots)  # a lost inner block (remove) leaves its children extending nothing cached



@dataclass
class _ReqState:
    """Scheduler-side view of one request: its GPU blocks and how many host blocks are saved."""

    request: Any
    gpu_blocks: list[int] = field(default_factory=list)
    num_saved: int = 0  # leading host blocks known to be in the host tier
    full: bool = False  # a save of it did not fit: nothing more of it is saved
    lookup_computed: int = 0  # num_computed_tokens given to the last lookup


def _cold_keys(config: KVStoreConnectorConfig, spec: KVSpec, model_name: str, world_size: int) -> ColdKeys:
    """The scheduler's :class:`ColdKeys` for ``config.cold_tier`` (a lookup-only remote tier when it has a
    server; it asks for rank 0's shard of a block, which every rank writes alongside its own)."""
    cold = config.cold_tier
    if cold is None:
        return ColdKeys()
    remote = None
    if cold.remote_url is not None:
        from kvstore.integrations.lmcache import LMCacheRemoteTier

        remote = LMCacheRemoteTier(cold, spec, model_name=model_name, world_size=world_size, worker_id=0, staging=False)
    return ColdKeys(cold.capacity_blocks(spec), remote)


class _SchedulerSide:
    """Prefix lookup, load/save planning and the per-step metadata (see the module docstring).

    Policy work is batched per step: the accesses of a step's hits are recorded as they are
    planned and handed to the policy at once (before any insert, so its order is what the
    step read), and the blocks every request of the step saves go in one insert, so a full
    host tier names all of the step's victims in one ``victims`` call.
    """

    def __init__(
        self, config: KVStoreConnectorConfig, spec: KVSpec, gpu_block: int, cost: CostModel, *, model_name: str = "kvstore",
        world_size: int = 1,
    ) -> None:
        self.spec = spec
        self.gpu_block = gpu_block
        self.per_host = spec.block_size // gpu_block
        self.index = HostTierIndex(
            spec, config.host_blocks, config.policy, cost, leaves_only=config.leaves_only, cold=_cold_keys(config, spec, model_name, world_size),
        )
        self.reqs: dict[str, _ReqState] = {}
        self._meta = KVStoreConnectorMetadata()
        self._touched: list[np.ndarray | list[int]] = []  # this step's hits, not yet told to the policy

    def _keys(self, request: "Request") -> list[bytes]:
        """Host block keys of ``request``: the hash of the last vLLM block of each full host block."""
        k = self.per_host
        return request.block_hashes[k - 1 :: k] if k > 1 else request.block_hashes

    def _state(self, request: "Request") -> _ReqState:
        st = self.reqs.get(request.request_id)
        if st is None:
            st = self.reqs[request.request_id] = _ReqState(request)
        return st

    def _flush_touches(self) -> None:
        """Tell the policy about the hits recorded since the last flush, in order."""
        if self._touched:
            touched, self._touched = self._touched, []
            self.index.touch(np.concatenate(touched) if len(touched) > 1 else touched[0])

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        hits, _ = self.index.match(self._keys(request))
        # vLLM must compute at least the last prompt token; loads are whole GPU blocks.
        limit = (request.num_tokens - 1) // self.gpu_block * self.gpu_block
        matched = min(hits * self.spec.block_size, limit)
        self._state(request).lookup_computed = num_computed_tokens
        return max(0, matched - num_computed_tokens), False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        st = self._state(request)
        st.gpu_blocks = list(blocks.get_block_ids()[0])
        if num_external_tokens == 0:
            return
        bs, g = self.spec.block_size, self.gpu_block
        first, end = st.lookup_computed // g, (st.lookup_computed + num_external_tokens) // g
        h0, h1 = first // self.per_host, -(-end // self.per_host)
        chain = self._keys(request)
        keys = chain[h0:h1]
        index, meta = self.index, self._meta
        slots = list(map(index.slot_of.get, keys))
        done = 0  # slots[:done] are pinned
        while None in slots[done:]:  # a cold hit: promote it into a fresh slot, fetched before the load
            i = slots.index(None, done)
            index.pinned[slots[done:i]] = True
            self._flush_touches()
            got, evicted = index.insert([keys[i]], [(h0 + i) * bs], [chain[h0 + i - 1] if h0 + i else None])
            meta.spills.extend(evicted)
            if not got:
                raise CapacityError(f"host tier: no unpinned slot for a cold hit ({np.count_nonzero(index.pinned)} pinned)")
            slots[i] = got[0]
            meta.fetches.append((got[0], keys[i]))
            slots[i + 1 :] = map(index.slot_of.get, keys[i + 1 :])  # the insert may have evicted later hits
            done = i
        slot_arr = np.asarray(slots, dtype=np.int64)
        index.pinned[slot_arr[done:]] = True
        self._touched.append(slot_arr)
        meta.loads[request.request_id] = BlockCopy.build(slot_arr, keys, st.gpu_blocks[first:end], first % self.per_host, self.per_host)
        st.num_saved = max(st.num_saved, end // self.per_host)

    def _unsaved(self, st: _ReqState, upto_tokens: int) -> tuple[_ReqState, list[int], list[bytes], int] | None:
        """Host blocks of ``st`` fully computed by ``upto_tokens`` and not saved yet: record the
        resident ones as hits; ``(st, indices of the others, the request's keys, n_full)`` (or None)."""
        keys = self._keys(st.request)
        n_full = min(upto_tokens // self.spec.block_size, len(keys), len(st.gpu_blocks) // self.per_host)
        if st.full or n_full <= st.num_saved:
            return None
        get = self.index.slot_of.get
        head = [s for s in map(get, keys[: st.num_saved]) if s is not None]
        self.index.pinned[head] = True  # its saved prefix: the continuation extends it, so not its victim
        found = [get(k) for k in keys[st.num_saved : n_full]]
        new = [st.num_saved + j for j, s in enumerate(found) if s is None]
        if len(new) < len(found):
            hit = np.array([s for s in found if s is not None], dtype=np.int64)
            self.index.pinned[hit] = True  # the step's inserts extend them: not victims of the same step
            self._touched.append(hit)
        return st, new, keys, n_full

    def _plan_saves(self, unsaved: Sequence[tuple[_ReqState, list[int], list[bytes], int]]) -> BlockCopy | None:
        """One insert for the new host blocks of ``unsaved`` (from :meth:`_unsaved`, in request
        order) and their copies (or None). A key two requests both lack (a shared prefix block
        not in the tier) is saved once, from the first. When the tier cannot take them all, the
        blocks first in line get slots; a request that got fewer than it asked for is saved no
        further (:meth:`_unsaved` pinned its saved prefix, so what it lacks could only come from
        evicting other requests' blocks in every later step: a tier smaller than a prompt keeps
        the prompt's head, which a lookup can reach, instead of thrashing through its tail)."""
        self._flush_touches()
        bs, k = self.spec.block_size, self.per_host
        first: dict[bytes, int] = {}  # key -> its index in keys
        keys: list[bytes] = []
        parents: list[bytes | None] = []
        src: list[tuple[_ReqState, int]] = []  # (request, host block index) each key is saved from
        refs: list[list[int]] = []
        for st, new, chain, _ in unsaved:
            r = []
            for i in new:
                key = chain[i]
                j = first.setdefault(key, len(keys))
                if j == len(keys):
                    keys.append(key)
                    parents.append(chain[i - 1] if i else None)
                    src.append((st, i))
                r.append(j)
            refs.append(r)
        slots, evicted = self.index.insert(keys, [i * bs for _, i in src], parents)
        self._meta.spills.extend(evicted)
        fit = len(slots)
        for (st, new, _, n_full), r in zip(unsaved, refs):
            miss = next((t for t, j in enumerate(r) if j >= fit), None)
            st.num_saved = n_full if miss is None else new[miss]
            st.full = miss is not None
        if not fit:
            return None
        # The saved host blocks need not be adjacent, but each brings its k GPU blocks in order.
        gpu = [st.gpu_blocks[i * k + j] for st, i in src[:fit] for j in range(k)]
        return BlockCopy.build(slots, keys[:fit], gpu, 0, k)

    def build_connector_meta(self, so: "SchedulerOutput") -> KVStoreConnectorMetadata:
        unsaved = []
        for req in so.scheduled_new_reqs:
            st = self.reqs.get(req.req_id)
            if st is None:
                continue
            st.gpu_blocks = list(req.block_ids[0])
            upto = min(req.num_computed_tokens + so.num_scheduled_tokens[req.req_id], st.request.num_prompt_tokens)
            if (u := self._unsaved(st, upto)) is not None:
                unsaved.append(u)
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self.reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                st.gpu_blocks = list(new_ids[0]) if new_ids is not None else []
                st.num_saved = 0
                st.full = False
            elif new_ids is not None:
                st.gpu_blocks.extend(new_ids[0])
            upto = min(cached.num_computed_tokens[i] + so.num_scheduled_tokens[req_id], st.request.num_prompt_tokens)
            if (u := self._unsaved(st, upto)) is not None:
                unsaved.append(u)
        saves = self._plan_saves(unsaved) if unsaved else None
        self._flush_touches()
        meta, self._meta = self._meta, KVStoreConnectorMetadata()
        meta.saves = BlockCopy.concat([saves] if saves is not None else [])
        self.index.pinned[:] = False
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Save the finished request's remaining full blocks (its decode output) asynchronously;
        vLLM keeps its GPU blocks until the worker reports the save in ``get_finished``."""
        st = self.reqs.pop(request.request_id, None)
        if st is None or request.num_computed_tokens == 0:
            return False, None
        st.gpu_blocks = list(block_ids)
        unsaved = self._unsaved(st, request.num_computed_tokens)
        copy = self._plan_saves([unsaved]) if unsaved is not None else None
        if copy is None:
            return False, None
        self._meta.finished_saves[request.request_id] = copy
        return True, None

    def update_connector_output(self, output: "KVConnectorOutput") -> None:
        wm = output.kv_connector_worker_meta
        if isinstance(wm, KVStoreWorkerMetadata) and wm.lost_slots:
            self.index.remove(wm.lost_slots)
