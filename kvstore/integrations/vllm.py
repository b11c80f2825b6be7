"""kvstore inside vLLM (0.32): a KV connector with a host-memory tier, and CachePolicy adapters.

**KVStoreConnector** puts kvstore's host tier (a :class:`~kvstore.blocks.BlockPool` in pinned
CPU memory, managed by a kvstore eviction policy, "asym" by default) beneath vLLM's GPU prefix
cache, with an optional LMCache cold tier below it::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVStoreConnector",
        "kv_connector_module_path": "kvstore.integrations.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"host_blocks": 4096, "policy": "asym"}}'

The connector runs as two objects in two processes, as vLLM requires:

* Scheduler side (:class:`HostTierIndex`): the truth of what the host tier holds. A host block
  holds ``block_size`` tokens (a multiple of vLLM's block size) and is keyed by vLLM's chained
  prefix hash of its last vLLM-size block, so a key names the whole prefix. A lookup walks a
  request's keys in order and stops at the first miss, without side effects. Slots are
  allocated here (a BlockPool on the ``meta`` device: bookkeeping without memory) and every
  copy is sent to the worker as explicit (host slot, sub-block, GPU block) triples.
* Worker side (:class:`HostTierWorker`): the storage (a BlockPool on the CPU) and the copies.
  Each step it (1) spills evicted slots to the cold tier, (2) fetches cold hits into their new
  slots, (3) starts whole-block saves of finished requests (reported through
  ``get_finished``), (4) loads hits into vLLM's GPU blocks layer by layer (``wait_for_layer_load``
  waits for one layer), and saves newly computed prompt blocks layer by layer as each layer's
  forward finishes (``save_kv_layer``; ``wait_for_save`` completes them). On CUDA the copies
  run on one side stream with an event per layer; on CPU they run synchronously, a layer's
  load inside its ``wait_for_layer_load``. One stream orders every copy after the ones of
  earlier steps, which is what makes reusing a slot in a later step safe.

Layout. In vLLM 0.32 every attention layer's cache is a ``[num_blocks, H, N, C]`` view
(logical order; any physical stride order, padding or kernel-block split) with K and V packed
in the content dim ``C = 2 * head_size``. A host slot holds ``[L, 2, block_size, H, D]`` (kvstore's
block layout): element ``[l, kv, j * N + n, h, d]`` of host block ``b`` is element
``[h, n, kv * D + d]`` of layer ``l``'s page of the ``j``-th GPU block of ``b``. The map is a
bijection, so a save then load is bit-exact whatever the backend means by C (the GPU backends
pack K|V per token as above; the CPU backend reads the page as ``[H, 2, N, D]``: the bytes
round-trip unchanged either way).

Failure: a load whose host copy is gone (its slot was lost or overwritten, or its cold copy
was evicted by LMCache) does not raise: its GPU blocks are reported by
``get_block_ids_with_load_errors`` (vLLM's ``kv_load_failure_policy`` then recomputes) and the
lost slots go back to the scheduler in the worker metadata, which forgets them.

**CachePolicy adapters** expose every online kvstore eviction policy to vLLM's own
OffloadingConnector: ``"eviction_policy": "kvstore_asym", "cache_policy_module_path":
"kvstore.integrations.vllm"`` (any registered name after ``kvstore_``).
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from itertools import islice, takewhile
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.v1.kv_offload.base import OffloadKey, ReqContext
from vllm.v1.kv_offload.cpu.policies.base import CachePolicy, ChunkStatus
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvstore.blocks import BlockPool
from kvstore.errors import CapacityError, ConfigError, ShapeError
from kvstore.evict import POLICIES, BlockInfo, EvictionPolicy, make_policy
from kvstore.evict.base import PrefixTree
from kvstore.evict.cost import CostModel
from kvstore.integrations.lmcache import ColdTierConfig
from kvstore.spec import KVSpec, ModelCost

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = [
    "KVStoreConnector",
    "KVStoreConnectorConfig",
    "KVStoreConnectorMetadata",
    "KVStoreWorkerMetadata",
    "BlockCopy",
    "HostTierIndex",
    "HostTierWorker",
    "KVStoreCachePolicy",
    "cache_policy_class",
]


# ====================================================================== configuration
@dataclass(frozen=True, kw_only=True)
class KVStoreConnectorConfig:
    """``kv_connector_extra_config`` of :class:`KVStoreConnector`.

    Attributes:
        host_blocks: capacity of the host tier in host blocks.
        block_size: tokens per host block; a multiple of vLLM's block size (default: equal).
        policy: kvstore eviction policy of the host tier (a name in ``kvstore.evict.POLICIES``).
        pin_memory: page-lock the host tier (default: when CUDA is available).
        cold_tier: LMCache cold tier, e.g. ``{"path": "/mnt/kv", "max_gib": 64}``; off when None.
        leaves_only: evict only blocks that no cached block extends (default). vLLM loads a
            prefix only up to its first missing block, so a block whose successor is cached
            holds that whole suffix up; evicting from the leaves keeps every cached block
            reachable. False lets the policy take any unpinned block (multi-segment view).
    """

    host_blocks: int = 4096
    block_size: int | None = None
    policy: str = "asym"
    pin_memory: bool | None = None
    cold_tier: ColdTierConfig | None = None
    leaves_only: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.host_blocks, bool) or not isinstance(self.host_blocks, int) or self.host_blocks <= 0:
            raise ConfigError(f"kv_connector_extra_config.host_blocks must be a positive int, got {self.host_blocks!r}")
        if self.block_size is not None and (
            isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0
        ):
            raise ConfigError(f"kv_connector_extra_config.block_size must be a positive int, got {self.block_size!r}")
        if not isinstance(self.policy, str) or self.policy not in POLICIES or POLICIES[self.policy].offline:
            online = sorted(n for n, c in POLICIES.items() if not c.offline)
            raise ConfigError(f"kv_connector_extra_config.policy={self.policy!r} is not an online kvstore policy; known: {online}")
        if not isinstance(self.leaves_only, bool):
            raise ConfigError(f"kv_connector_extra_config.leaves_only must be a bool, got {self.leaves_only!r}")
        if self.pin_memory is not None and not isinstance(self.pin_memory, bool):
            raise ConfigError(f"kv_connector_extra_config.pin_memory must be a bool, got {self.pin_memory!r}")

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> "KVStoreConnectorConfig":
        """Validate vLLM's ``kv_connector_extra_config`` dict; unknown keys are named in the error."""
        extra = dict(extra or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ConfigError(f"unknown kv_connector_extra_config key(s) {unknown}; known: {sorted(known)}")
        if extra.get("cold_tier") is not None:
            extra["cold_tier"] = ColdTierConfig.from_dict(extra["cold_tier"])
        return cls(**extra)


def _host_spec(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig", block_size: int | None) -> tuple[KVSpec, int, list[str]]:
    """The host tier's KVSpec, vLLM's block size, and the attention layer names in host order."""
    groups = [g for g in kv_cache_config.kv_cache_groups if g.enable_kv_transfer]
    if len(groups) != 1:
        raise ConfigError(f"KVStoreConnector supports models with one KV cache group, got {len(groups)}")
    spec = groups[0].kv_cache_spec
    for attr in ("num_kv_heads", "head_size", "dtype"):
        if not hasattr(spec, attr):
            raise ConfigError(f"KVStoreConnector needs an attention KV cache, got {type(spec).__name__}")
    if spec.head_size_v != spec.head_size:
        raise ConfigError(f"KVStoreConnector needs head_size == head_size_v, got {spec.head_size} and {spec.head_size_v}")
    gpu_block = spec.block_size
    host_block = gpu_block if block_size is None else block_size
    if host_block % gpu_block:
        raise ConfigError(
            f"kv_connector_extra_config.block_size={host_block} must be a multiple of vLLM's block size {gpu_block}"
        )
    hf = vllm_config.model_config.hf_text_config
    q_per_kv = max(1, getattr(hf, "num_attention_heads", 1) // max(1, getattr(hf, "num_key_value_heads", 1)))
    kv = KVSpec(
        num_layers=len(groups[0].layer_names),
        num_kv_heads=spec.num_kv_heads,
        num_q_heads=spec.num_kv_heads * q_per_kv,
        head_dim=spec.head_size,
        dtype=spec.dtype,
        block_size=host_block,
    )
    return kv, gpu_block, list(groups[0].layer_names)


def _cost_model(vllm_config: "VllmConfig", spec: KVSpec) -> CostModel:
    """Recompute FLOPs of the served model (Llama-style estimate from its HF config)."""
    hf = vllm_config.model_config.hf_text_config
    hidden = int(getattr(hf, "hidden_size", spec.num_q_heads * spec.head_dim))
    layers = int(getattr(hf, "num_hidden_layers", spec.num_layers))
    vocab = int(getattr(hf, "vocab_size", 32000))
    params = 12 * layers * hidden * hidden + 2 * vocab * hidden
    return CostModel(model=ModelCost(num_params=float(params), hidden_size=hidden, num_layers=layers))


# ====================================================================== scheduler side
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
    would strand everything after it. The cold tier's
    contents are mirrored as an LRU of keys capped at its capacity (LMCache evicts LRU too; a
    stale entry only costs a failed load, reported and recomputed).

    Args:
        spec: host block shape (for sizes and costs).
        num_slots: host tier capacity in blocks.
        policy: kvstore eviction policy name or instance.
        cost: recompute/reload cost model the policy reads.
        cold_capacity: blocks the cold tier holds (0: no cold tier).
        leaves_only: evict only blocks that no cached block extends.
    """

    def __init__(
        self, spec: KVSpec, num_slots: int, policy: str | EvictionPolicy, cost: CostModel, cold_capacity: int = 0,
        *, leaves_only: bool = False,
    ) -> None:
        self.spec = spec
        self.leaves_only = leaves_only
        self.cost = cost
        self.pool = BlockPool(spec, num_slots, device="meta", name="host")
        self.info = BlockInfo(num_slots)
        self.policy = make_policy(policy, self.info)
        self.slot_of: dict[bytes, int] = {}
        self.key_of: list[bytes | None] = [None] * num_slots
        self.cold: OrderedDict[bytes, None] = OrderedDict()
        self.cold_capacity = cold_capacity
        self.pinned = np.zeros(num_slots, dtype=np.bool_)
        self.tree = PrefixTree(num_slots)  # which cached slot each slot's block extends
        self._clock = 0
        self._block_bytes = spec.bytes_per_block
        self._reload_cost = float(cost.reload_seconds(self._block_bytes)) if cold_capacity else np.inf

    def __len__(self) -> int:
        return len(self.slot_of)

    def match(self, keys: Sequence[bytes]) -> tuple[int, int]:
        """Leading keys present: ``(in host or cold, in host only)``. No side effects."""
        slot_of, cold = self.slot_of, self.cold
        host = n = len(list(takewhile(slot_of.__contains__, keys)))
        for k in islice(keys, host, None):
            if k not in slot_of and k not in cold:
                break
            n += 1
        return n, host

    def touch(self, slots: Sequence[int] | np.ndarray) -> None:
        """Record an access to resident ``slots`` (``[n]``, prefix order: the last is the most recent)."""
        arr = np.asarray(slots, dtype=np.int64)
        if arr.size == 0:
            return
        self._clock += 1
        self.info.last_access[arr] = self._clock
        self.info.access_count[arr] += 1
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
            if self.cold_capacity:
                for _, k in evicted:
                    self._cold_add(k)
            fit = reused.size + self.pool.num_free
            keys, positions = keys[:fit], positions[:fit]
        if not keys:
            return [], evicted
        fresh = len(keys) - reused.size
        slots = np.concatenate([reused, self.pool.allocate(np.zeros(fresh, dtype=np.int64))]) if fresh else reused
        for s, k in zip(slots.tolist(), keys):
            self.slot_of[k] = s
            self.key_of[s] = k
            self.cold.pop(k, None)
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
        info.access_count[slots] = 1
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

    def _cold_add(self, key: bytes) -> None:
        self.cold[key] = None
        self.cold.move_to_end(key)
        while len(self.cold) > self.cold_capacity:
            self.cold.popitem(last=False)


@dataclass
class BlockCopy:
    """Copies between vLLM GPU blocks and host slots, one entry per GPU block.

    Arrays (all ``[n]`` int64): ``slots`` host slot, ``subs`` which GPU-size piece of the host
    block, ``gpu_blocks`` vLLM block id. ``keys[i]`` is the key of the host block (checked on
    load: a slot whose key differs lost its content).
    """

    slots: np.ndarray
    subs: np.ndarray
    gpu_blocks: np.ndarray
    keys: list[bytes]

    @classmethod
    def build(cls, slots: Sequence[int] | np.ndarray, keys: Sequence[bytes], gpu_blocks: Sequence[int], first_sub: int, per_host: int) -> "BlockCopy":
        """GPU blocks ``gpu_blocks`` hold consecutive pieces of the host blocks ``slots``,
        starting at piece ``first_sub`` of ``slots[0]``; ``per_host`` pieces per host block."""
        n = len(gpu_blocks)
        if per_host == 1:  # one GPU block per host block (vLLM's block size): no pieces to map
            return cls(np.array(slots[:n], dtype=np.int64), np.zeros(n, dtype=np.int64), np.array(gpu_blocks, dtype=np.int64), list(keys[:n]))
        piece = first_sub + np.arange(n, dtype=np.int64)
        host_idx = piece // per_host
        slot_arr = np.asarray(slots, dtype=np.int64)[host_idx]
        return cls(slot_arr, piece % per_host, np.asarray(gpu_blocks, dtype=np.int64), [keys[i] for i in host_idx.tolist()])

    def __len__(self) -> int:
        return int(self.gpu_blocks.size)

    @staticmethod
    def concat(copies: Sequence["BlockCopy"]) -> "BlockCopy":
        if not copies:
            e = np.empty(0, dtype=np.int64)
            return BlockCopy(e, e, e, [])
        return BlockCopy(
            np.concatenate([c.slots for c in copies]),
            np.concatenate([c.subs for c in copies]),
            np.concatenate([c.gpu_blocks for c in copies]),
            [k for c in copies for k in c.keys],
        )


@dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker, one step. Applied in field order (see the module docstring)."""

    spills: list[tuple[int, bytes]] = field(default_factory=list)
    fetches: list[tuple[int, bytes]] = field(default_factory=list)
    finished_saves: dict[str, BlockCopy] = field(default_factory=dict)
    loads: dict[str, BlockCopy] = field(default_factory=dict)
    saves: BlockCopy = field(default_factory=lambda: BlockCopy.concat([]))


@dataclass
class KVStoreWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler: host slots whose content was found lost (the scheduler forgets them)."""

    lost_slots: set[int] = field(default_factory=set)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, KVStoreWorkerMetadata)
        return KVStoreWorkerMetadata(self.lost_slots | other.lost_slots)


@dataclass
class _ReqState:
    """Scheduler-side view of one request: its GPU blocks and how many host blocks are saved."""

    request: Any
    gpu_blocks: list[int] = field(default_factory=list)
    num_saved: int = 0  # leading host blocks known to be in the host tier
    lookup_computed: int = 0  # num_computed_tokens given to the last lookup


class _SchedulerSide:
    """Prefix lookup, load/save planning and the per-step metadata (see the module docstring).

    Policy work is batched per step: the accesses of a step's hits are recorded as they are
    planned and handed to the policy at once (before any insert, so its order is what the
    step read), and the blocks every request of the step saves go in one insert, so a full
    host tier names all of the step's victims in one ``victims`` call.
    """

    def __init__(self, config: KVStoreConnectorConfig, spec: KVSpec, gpu_block: int, cost: CostModel) -> None:
        self.spec = spec
        self.gpu_block = gpu_block
        self.per_host = spec.block_size // gpu_block
        cold = config.cold_tier.capacity_blocks(spec) if config.cold_tier is not None else 0
        self.index = HostTierIndex(spec, config.host_blocks, config.policy, cost, cold, leaves_only=config.leaves_only)
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
        if n_full <= st.num_saved:
            return None
        get = self.index.slot_of.get
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
        blocks first in line get slots and each request retries from its first unsaved block."""
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


# ====================================================================== worker side
#: a D2H copy landed in pinned memory, waiting for its host scatter: (copy, layer, buffer)
_Staged = tuple[BlockCopy, int, torch.Tensor]


@dataclass
class _Layer:
    """One attention layer's cache as ``[num_blocks, r, H, Nk, 2, D]`` (a view; r kernel blocks per block)."""

    name: str
    cache: torch.Tensor


class HostTierWorker:
    """Host tier storage and the copies between it, vLLM's KV caches and the cold tier.

    Args:
        spec: host block shape.
        num_slots: host tier capacity in blocks.
        gpu_block: vLLM's block size (tokens); ``spec.block_size`` is a multiple of it.
        layer_names: attention layers in host order (``spec.num_layers`` names).
        pin_memory: page-lock the host pool (default: when CUDA is available).
        cold: the cold tier, or None.

    Public copy methods take a lock, so saves and loads from several threads are safe.
    """

    def __init__(
        self,
        spec: KVSpec,
        num_slots: int,
        gpu_block: int,
        layer_names: Sequence[str],
        *,
        pin_memory: bool | None = None,
        cold=None,
    ) -> None:
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.spec = spec
        self.per_host = spec.block_size // gpu_block
        self.gpu_block = gpu_block
        self.pool = BlockPool(spec, num_slots, device="cpu", pin_memory=pin, name="host")
        self.layer_names = list(layer_names)
        self.layers: list[_Layer] = []
        self.cold = cold
        self.slot_key: list[bytes | None] = [None] * num_slots
        self.lost_slots: set[int] = set()
        self.failed_blocks: set[int] = set()
        self._lock = threading.RLock()
        self.device: torch.device | None = None
        self.stream: torch.cuda.Stream | None = None
        # per-step state
        self._loads: BlockCopy | None = None
        self._loaded: list[bool] = []
        self._load_events: list[torch.cuda.Event | None] = []
        self._pending_saves: list[tuple[torch.cuda.Event, list[_Staged]]] = []
        self._finished: dict[str, torch.cuda.Event | None] = {}
        self._finished_staged: dict[str, list[_Staged]] = {}
        self._staged: list[list[_Staged]] = []  # D2H copies in flight, scattered by _unstage

    # ------------------------------------------------------------------ registration
    def register(self, kv_caches: Mapping[str, torch.Tensor], num_gpu_blocks: int) -> None:
        """Take vLLM's per-layer caches ``[num_blocks * r, H, Nk, 2 * D]`` (any strides)."""
        s = self.spec
        missing = [n for n in self.layer_names if n not in kv_caches]
        if missing:
            raise ShapeError(f"register_kv_caches: no KV cache for layers {missing[:4]} (got {list(kv_caches)[:4]}...)")
        layers = []
        for name in self.layer_names:
            t = kv_caches[name]
            if t.dim() != 4 or t.shape[0] % num_gpu_blocks or t.dtype != s.dtype:
                raise ShapeError(
                    f"layer {name}: expected a [num_blocks*r, H, N, C] {s.dtype} cache with num_blocks={num_gpu_blocks}, "
                    f"got {t.dtype} {tuple(t.shape)}"
                )
            r = t.shape[0] // num_gpu_blocks
            if t.shape[1] != s.num_kv_heads or t.shape[2] * r != self.gpu_block or t.shape[3] != 2 * s.head_dim:
                raise ShapeError(
                    f"layer {name}: page {tuple(t.shape[1:])} x {r} kernel blocks does not hold {self.gpu_block} tokens "
                    f"of {s.num_kv_heads} heads x 2*{s.head_dim}"
                )
            layers.append(_Layer(name, t.unflatten(0, (num_gpu_blocks, r)).unflatten(-1, (2, s.head_dim))))
        self.layers = layers
        self._index = {ly.name: i for i, ly in enumerate(layers)}
        self.device = layers[0].cache.device
        if self.device.type == "cuda":
            self.stream = torch.cuda.Stream(self.device)

    # ------------------------------------------------------------------ element maps
    def _host_view(self, layer: int) -> torch.Tensor:
        """Host layer ``l`` as ``[slots, 2, per_host, r, Nk, H, D]`` (a view of the pool)."""
        s, r = self.spec, self.layers[layer].cache.shape[1]
        nk = self.gpu_block // r
        return self.pool.kv[:, layer].view(self.pool.num_slots, 2, self.per_host, r, nk, s.num_kv_heads, s.head_dim)

    def _gather_gpu(self, layer: int, gpu_blocks: torch.Tensor) -> torch.Tensor:
        """Pages of ``gpu_blocks`` in host order ``[n, 2, r, Nk, H, D]`` (a new tensor on the cache's device)."""
        return self.layers[layer].cache[gpu_blocks].permute(0, 4, 1, 3, 2, 5)

    def _scatter_gpu(self, layer: int, gpu_blocks: torch.Tensor, src: torch.Tensor) -> None:
        """Write ``src: [n, 2, r, Nk, H, D]`` into the pages of ``gpu_blocks``."""
        self.layers[layer].cache[gpu_blocks] = src.permute(0, 2, 4, 3, 1, 5)

    # ------------------------------------------------------------------ step entry points
    def start(self, meta: KVStoreConnectorMetadata) -> None:
        """Apply a step's spills, fetches and finished-request saves, and start its loads."""
        with self._lock:
            if meta.spills or meta.fetches:
                self._sync()
                self._spill(meta.spills)
                self._fetch(meta.fetches)
            for req_id, copy in meta.finished_saves.items():
                event = self._finished[req_id] = self._save_layers(copy, range(len(self.layers)))
                if event is not None:
                    self._finished_staged[req_id] = self._staged.pop()
            loads = BlockCopy.concat(list(meta.loads.values()))
            self._loads = loads if len(loads) else None
            self._loaded = [False] * len(self.layers)
            self._load_events = [None] * len(self.layers)
            if self._loads is not None:
                self._loads = self._verified(self._loads)
            if self._loads is not None and self.stream is not None:
                for layer in range(len(self.layers)):
                    self._load_events[layer] = self._load_layer(self._loads, layer)

    def wait_layer(self, name: str) -> None:
        """Make layer ``name``'s loads visible to the compute stream (CPU: run them now)."""
        i = self._index.get(name)
        if i is None or self._loads is None or self._loaded[i]:
            return
        with self._lock:
            if self.stream is None:
                self._load_layer(self._loads, i)
            else:
                torch.cuda.current_stream(self.device).wait_event(self._load_events[i])
            self._loaded[i] = True

    def save_layer(self, name: str, saves: BlockCopy) -> None:
        """Start copying layer ``name`` of this step's new blocks to the host."""
        i = self._index.get(name)
        if i is None or not len(saves):
            return
        with self._lock:
            event = self._save_layers(saves, (i,))
            if event is not None:
                self._pending_saves.append((event, self._staged.pop()))

    def finish_step(self) -> None:
        """Complete this step's saves and any loads no layer waited for."""
        with self._lock:
            if self._loads is not None:
                for i, done in enumerate(self._loaded):
                    if not done:
                        self.wait_layer(self.layers[i].name)
                self._loads = None
            for event, staged in self._pending_saves:
                event.synchronize()
                self._unstage(staged)
            self._pending_saves.clear()

    def finished_sending(self) -> set[str]:
        """Requests whose finished-request save is complete."""
        with self._lock:
            done = {r for r, ev in self._finished.items() if ev is None or ev.query()}
            for r in done:
                ev = self._finished.pop(r)
                if ev is not None:
                    ev.synchronize()
                    self._unstage(self._finished_staged.pop(r, []))
            return done

    def take_failed_blocks(self) -> set[int]:
        with self._lock:
            out, self.failed_blocks = self.failed_blocks, set()
            return out

    def take_lost_slots(self) -> set[int]:
        with self._lock:
            out, self.lost_slots = self.lost_slots, set()
            return out

    # ------------------------------------------------------------------ direct copies (tests, tools)
    def save_blocks(self, copy: BlockCopy) -> None:
        """Copy GPU blocks into host slots, all layers, and wait for it."""
        with self._lock:
            event = self._save_layers(copy, range(len(self.layers)))
            if event is not None:
                event.synchronize()
                self._unstage(self._staged.pop())

    def load_blocks(self, copy: BlockCopy) -> set[int]:
        """Copy host slots into GPU blocks, all layers, and wait; returns the GPU blocks that failed."""
        with self._lock:
            ok = self._verified(copy)
            if ok is not None:
                for layer in range(len(self.layers)):
                    event = self._load_layer(ok, layer)
                    if event is not None:
                        event.synchronize()
            return self.take_failed_blocks()

    def drop(self, slots: Iterable[int]) -> None:
        """Invalidate host copies (their loads fail from now on)."""
        with self._lock:
            for s in slots:
                self.slot_key[s] = None

    # ------------------------------------------------------------------ internals
    def _sync(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
            for event, staged in self._pending_saves:
                self._unstage(staged)
            self._pending_saves.clear()

    def _spill(self, spills: Sequence[tuple[int, bytes]]) -> None:
        if self.cold is None:
            return
        for slot, key in spills:
            if self.slot_key[slot] == key:
                self.cold.put(int.from_bytes(key, "big"), self.pool.kv[slot])

    def _fetch(self, fetches: Sequence[tuple[int, bytes]]) -> None:
        for slot, key in fetches:
            ok = self.cold is not None and self.cold.get(int.from_bytes(key, "big"), self.pool.kv[slot])
            self.slot_key[slot] = key if ok else None

    def _verified(self, copy: BlockCopy) -> BlockCopy | None:
        """``copy`` without the GPU blocks whose host copy is gone (recorded as failed)."""
        keys, slot_key = copy.keys, self.slot_key
        bad = [i for i, (s, k) in enumerate(zip(copy.slots.tolist(), keys)) if slot_key[s] != k]
        if not bad:
            return copy
        self.failed_blocks.update(copy.gpu_blocks[bad].tolist())
        self.lost_slots.update(copy.slots[bad].tolist())
        keep = np.ones(len(copy), dtype=bool)
        keep[bad] = False
        if not keep.any():
            return None
        idx = np.flatnonzero(keep)
        return BlockCopy(copy.slots[idx], copy.subs[idx], copy.gpu_blocks[idx], [keys[i] for i in idx.tolist()])

    def _load_layer(self, copy: BlockCopy, layer: int) -> torch.cuda.Event | None:
        host = self._host_view(layer)
        slots, subs = torch.from_numpy(copy.slots), torch.from_numpy(copy.subs)
        src = host[slots, :, subs]  # [n, 2, r, Nk, H, D], CPU gather
        if self.stream is None:
            self._scatter_gpu(layer, torch.from_numpy(copy.gpu_blocks).to(self.device), src)
            return None
        staged = src.pin_memory() if self.pool.is_pinned else src
        with torch.cuda.stream(self.stream):
            moved = staged.to(self.device, non_blocking=True)
            self._scatter_gpu(layer, torch.from_numpy(copy.gpu_blocks).to(self.device, non_blocking=True), moved)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def _save_layers(self, copy: BlockCopy, layers: Iterable[int]) -> torch.cuda.Event | None:
        """Copy ``layers`` of ``copy``'s GPU blocks to their slots. CPU: done on return. CUDA:
        D2H into pinned staging on the side stream; the host scatter runs at :meth:`_unstage`
        (the staged pieces are pushed on ``self._staged``)."""
        for s, k in zip(copy.slots.tolist(), copy.keys):
            self.slot_key[s] = k
        slots, subs = torch.from_numpy(copy.slots), torch.from_numpy(copy.subs)
        if self.stream is None:
            gpu = torch.from_numpy(copy.gpu_blocks)
            for layer in layers:
                self._host_view(layer)[slots, :, subs] = self._gather_gpu(layer, gpu)
            return None
        staged: list[_Staged] = []
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            gpu = torch.from_numpy(copy.gpu_blocks).to(self.device, non_blocking=True)
            for layer in layers:
                packed = self._gather_gpu(layer, gpu).contiguous()
                buf = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
                buf.copy_(packed, non_blocking=True)
                staged.append((copy, layer, buf))
            event = torch.cuda.Event()
            event.record(self.stream)
        self._staged.append(staged)
        return event

    def _unstage(self, staged: list[_Staged]) -> None:
        for copy, layer, buf in staged:
            self._host_view(layer)[torch.from_numpy(copy.slots), :, torch.from_numpy(copy.subs)] = buf


# ====================================================================== the connector
class KVStoreConnector(KVConnectorBase_V1):
    """vLLM V1 KV connector backed by kvstore's host tier (see the module docstring)."""

    _cache_hit_source = CacheHitSource.HOST if hasattr(CacheHitSource, "HOST") else CacheHitSource.EXTERNAL_UNSPECIFIED

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig") -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.config = KVStoreConnectorConfig.from_extra_config(self._kv_transfer_config.kv_connector_extra_config)
        spec, gpu_block, layer_names = _host_spec(vllm_config, kv_cache_config, self.config.block_size)
        self.spec = spec
        self.scheduler: _SchedulerSide | None = None
        self.worker: HostTierWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler = _SchedulerSide(self.config, spec, gpu_block, _cost_model(vllm_config, spec))
        else:
            cold = None
            if self.config.cold_tier is not None:
                from kvstore.integrations.lmcache import LMCacheColdTier

                pc = vllm_config.parallel_config
                cold = LMCacheColdTier(
                    self.config.cold_tier, spec, world_size=pc.world_size, worker_id=pc.rank,
                    model_name=str(vllm_config.model_config.model),
                )
            self.worker = HostTierWorker(
                spec, self.config.host_blocks, gpu_block, layer_names, pin_memory=self.config.pin_memory, cold=cold
            )
        self._num_gpu_blocks = kv_cache_config.num_blocks

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is a future miss

    # ------------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register(kv_caches, self._num_gpu_blocks)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVStoreConnectorMetadata)
        self.worker.start(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker.wait_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: "AttentionMetadata", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVStoreConnectorMetadata)
        self.worker.save_layer(layer_name, meta.saves)

    def wait_for_save(self) -> None:
        self.worker.finish_step()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self.worker.finished_sending() or None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_failed_blocks()

    def build_connector_worker_meta(self) -> KVStoreWorkerMetadata | None:
        if self.worker is None:
            return None
        lost = self.worker.take_lost_slots()
        return KVStoreWorkerMetadata(lost) if lost else None

    def shutdown(self) -> None:
        if self.worker is not None and self.worker.cold is not None:
            self.worker.cold.close()

    # ------------------------------------------------------------------ scheduler side
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request, block_ids)

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        self.scheduler.update_connector_output(connector_output)

    def reset_cache(self) -> bool:
        idx = self.scheduler.index
        idx.remove(range(idx.pool.num_slots))
        idx.cold.clear()
        return True


# ====================================================================== CachePolicy adapters
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
        pos = self._positions.pop(key, 0)
        self._clock += 1
        info = self.info
        info.position[bid], info.num_tokens[bid], info.last_access[bid], info.access_count[bid] = pos, 1, self._clock, 1
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
                    if child is not None and parent is not None:
                        self._tree.link([child], [parent])
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
    return type(name, (KVStoreCachePolicy,), {"policy_name": policy, "__module__": __name__, "__qualname__": name})


def __getattr__(name: str) -> type[KVStoreCachePolicy]:
    """``kvstore_<policy>``: what vLLM's CachePolicyFactory resolves through ``cache_policy_module_path``."""
    if name.startswith("kvstore_"):
        return cache_policy_class(name[len("kvstore_") :])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
