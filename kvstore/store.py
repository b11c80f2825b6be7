"""KVStore: sequences of paged KV blocks across a device tier and a host tier.

A *block* holds ``spec.block_size`` consecutive tokens of one sequence, all layers, K and V.
Blocks have global ids; a sequence's block table is the list of its block ids in token
order. Every live block has one or more copies:

  * a device copy (a slot of the device pool, where attention reads it),
  * a host copy (a slot of the host pool: pinned CPU memory when CUDA is present),
  * or none: the block was *dropped* and the caller-supplied ``recompute`` callable restores
    it (lossless mode; AsymCache recomputes such a block alone at its own position).

A block may be on both tiers at once: a block loaded from the host keeps its (clean) host
copy, so evicting it again needs no copy. Writing a block invalidates its host copy.

When a tier has too few free slots the store asks that tier's eviction policy for victims
(kvstore/evict): device victims move to the host tier, host victims are dropped (only when
``recompute`` is set; otherwise the host tier is full and the store raises CapacityError).
The decision of *what* to evict is the policy's; the store only moves data.

Every public method validates its input before changing anything, so an error (always a
:class:`kvstore.errors.KVStoreError`) leaves the store exactly as it was. Bookkeeping is
numpy arrays indexed by block id: a decode step costs O(1) Python work, never a loop over a
sequence's blocks.

On CUDA, tier copies run on a dedicated stream; the store makes the current stream wait on
each copy's event before returning, so later kernels see the data, and returns the
:class:`~kvstore.transfer.TransferHandle` for callers that want to overlap. The CPU reads a
host slot only after the copy into it landed (``BlockMover.wait_writes``).

**A decode step** of one layer: ``append`` the token's K/V, ``select`` its tokens (PQ),
``attend`` (which ``fetch``es the selected rows: one layer's bytes, from the device copy of a
block or straight from the host copy, never moving whole blocks). Tier moves and eviction stay
whole-block (``ensure_resident``, ``offload``, ``load``): prefix reuse and lossless mode read
every token anyway. Attention with no selection reads every block in place, bringing missing
blocks to the device tier (reloaded or recomputed) in chunks it can hold.

**Syncs.** A decode step does not wait for the device. With ``defer_checks`` (the default on
CUDA) the checks that need values (NaN/Inf in K/V, queries or recomputed blocks; positions out
of range; the PQ index's drift) and the record of which blocks a step's attention read (for
the eviction policies) stay on the device until :meth:`KVStore.end_step`, which reads them all
at once: one sync per step, raising the first error found (the values it names are already
stored). The exceptions, each said where it happens: ``fetch``/``attend`` of a sequence with
dropped blocks reads the selection (one sync, to recompute the blocks it touches), and the
torch fetch path on CUDA reads the host rows' indices (one sync per layer; the UVA gather
kernel does not). Reads of host data (``read``, ``block_table``, ``residency``) and tier moves
given device tensors of block ids sync by nature.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
import torch

from kvstore.attn import merge_states, multi_segment_attention, paged_attention
from kvstore.attn.api import check_scale
from kvstore.attn.segments import BlockSegments
from kvstore import validate
from kvstore.blocks import BlockPool
from kvstore.errors import (
    BlockStateError,
    CapacityError,
    ConfigError,
    NonFiniteError,
    OutOfRangeError,
    RecomputeError,
    ShapeError,
    UnknownSequenceError,
)
from kvstore.evict import BlockInfo, EvictionPolicy, make_policy
from kvstore.evict.base import checked_victims
from kvstore.evict.cost import CostModel
from kvstore.pq.select import Budget, Selection
from kvstore.pq.sequence import PQConfig, PQSequenceIndex, select_batch
from kvstore.rowcache import RowCache
from kvstore.spec import KVSpec
from kvstore.syncs import DeferredChecks, upload
from kvstore.transfer import BlockMover, TransferHandle

__all__ = ["KVStore", "TierUsage", "RecomputeFn"]

#: ``recompute(seq_id, start_token, num_tokens) -> kv`` with ``kv: [num_layers, 2, num_tokens, Hkv, D]``
RecomputeFn = Callable[[int, int, int], torch.Tensor]

DEVICE, HOST, NONE = BlockInfo.TIER_DEVICE, BlockInfo.TIER_HOST, BlockInfo.TIER_NONE


class _Blocks(BlockInfo):
    """BlockInfo plus the store's own per-block state (policies see only the BlockInfo part)."""

    _FIELDS = {
        **BlockInfo._FIELDS,
        "dev_slot": (np.int64, -1),  # slot in the device pool, -1 if none
        "host_slot": (np.int64, -1),  # slot in the host pool, -1 if none (or stale)
        "refcount": (np.int32, 0),  # sequences whose table holds the block; 0 = id unused
        "filled": (np.int32, 0),  # tokens written, max over layers (num_tokens is min over layers)
    }
    dev_slot: np.ndarray
    host_slot: np.ndarray
    refcount: np.ndarray
    filled: np.ndarray


class _Seq:
    """One sequence: its block ids (``blocks[:num_blocks]``) and tokens written per layer."""

    __slots__ = ("blocks", "num_blocks", "layer_lens")

    def __init__(self, num_layers: int) -> None:
        self.blocks = np.empty(16, dtype=np.int64)
        self.num_blocks = 0
        self.layer_lens = np.zeros(num_layers, dtype=np.int64)

    @property
    def ids(self) -> np.ndarray:
        return self.blocks[: self.num_blocks]

    def push(self, new_ids: np.ndarray) -> None:
        need = self.num_blocks + new_ids.size
        if need > self.blocks.size:
            grown = np.empty(max(need, 2 * self.blocks.size), dtype=np.int64)
            grown[: self.num_blocks] = self.ids
            self.blocks = grown
        self.blocks[self.num_blocks : need] = new_ids
        self.num_blocks = need


@dataclass(frozen=True)
class TierUsage:
    """Memory accounting of one tier."""

    name: str
    blocks_total: int
    blocks_used: int
    bytes_total: int
    bytes_used: int


class KVStore:
    """Paged KV cache of many sequences over a device tier and a host tier.

    Args:
        spec: model shape and block size.
        device_blocks: capacity of the device tier in blocks.
        host_blocks: capacity of the host tier in blocks (0: no host tier).
        device: where the device tier lives (default: ``cuda`` when available, else ``cpu``).
        device_policy, host_policy: eviction policy of each tier, a registered name
            (kvstore.evict.POLICIES) or an instance. Offline policies (Belady) are refused.
        recompute: restores dropped blocks, see :data:`RecomputeFn`. Without it nothing is
            ever dropped: a full host tier raises CapacityError instead.
        cost: block cost model the policies read (default: a ModelCost derived from ``spec``).
        allow_nonfinite: accept NaN/Inf in appended K/V (rejected by default).
        defer_checks: defer the checks that need device values to :meth:`end_step` (module
            docstring, "Syncs"); default: on CUDA. Off, each check runs (and raises before
            anything changes) at once.
        pin_host: page-lock the host pool (default: when the device tier is on CUDA).
        pq: keep a product-quantized key index per sequence and layer (PQCache selection,
            :meth:`select`). Its uint8 codes stay on the device tier's device and do not move
            with blocks: 4 bytes per token per KV head per layer at the default 4 sub-vectors.
        row_cache: slots per KV head of each sequence's per-layer device cache of host-tier K
            and V rows (:class:`~kvstore.rowcache.RowCache`; 0: none): a fetch moves only the
            host rows the cache misses, and keeps them (up to half the slots per fetch).
    """

    def __init__(
        self,
        spec: KVSpec,
        *,
        device_blocks: int,
        host_blocks: int = 0,
        device: torch.device | str | None = None,
        device_policy: str | EvictionPolicy = "lru",
        host_policy: str | EvictionPolicy = "lru",
        recompute: RecomputeFn | None = None,
        cost: CostModel | None = None,
        allow_nonfinite: bool = False,
        defer_checks: bool | None = None,
        pin_host: bool | None = None,
        pq: PQConfig | None = None,
        row_cache: int = 0,
    ) -> None:
        if not isinstance(spec, KVSpec):
            raise ConfigError(f"KVStore.spec must be a KVSpec, got {type(spec).__name__}")
        device_blocks = validate.tier_blocks(device_blocks, "KVStore.device_blocks", lo=1)
        host_blocks = validate.tier_blocks(host_blocks, "KVStore.host_blocks")
        if recompute is not None and not callable(recompute):
            raise ConfigError(f"KVStore.recompute must be callable, got {type(recompute).__name__}")
        if pq is not None and not isinstance(pq, PQConfig):
            raise ConfigError(f"KVStore.pq must be a PQConfig or None, got {type(pq).__name__}")
        row_cache = validate.integer(row_cache, "KVStore.row_cache (slots per KV head)", lo=0, hi=2**31)
        if pq is not None and allow_nonfinite:
            raise ConfigError("KVStore: allow_nonfinite=True cannot be combined with a PQ index (it rejects NaN/Inf keys)")
        self.spec = spec
        self.pq = pq
        self.row_cache = row_cache
        self.device = validate.device(device, "KVStore.device") if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        pin = (self.device.type == "cuda") if pin_host is None else bool(pin_host)
        self.recompute = recompute
        self.allow_nonfinite = bool(allow_nonfinite)
        self.checks = DeferredChecks(immediate=not (self.device.type == "cuda" if defer_checks is None else bool(defer_checks)))
        self.cost = cost if cost is not None else _default_cost(spec)

        validate.tier_bytes(device_blocks, spec.bytes_per_block, self.device, "KVStore.device_blocks")
        validate.tier_bytes(host_blocks, spec.bytes_per_block, torch.device("cpu"), "KVStore.host_blocks")
        self.blocks = _Blocks(capacity=max(16, device_blocks + host_blocks))
        self.device_pool = BlockPool(spec, device_blocks, device=self.device, name="device", host=False)
        self.host_pool = BlockPool(spec, host_blocks, device="cpu", pin_memory=pin, name="host")
        self.device_policy = self._policy(device_policy, "device_policy")
        self.host_policy = self._policy(host_policy, "host_policy")
        if self.device_policy is self.host_policy:
            raise ConfigError("KVStore: device_policy and host_policy must be different policy objects")
        for policy in (self.device_policy, self.host_policy):  # one instance, one store: a second one is refused
            bind = getattr(policy, "bind", None)
            if bind is not None:
                bind(self)
        self.mover = BlockMover(self.device)

        self._seqs: dict[int, _Seq] = {}
        self._pq: dict[int, PQSequenceIndex] = {}
        self._row_caches: dict[tuple[int, int], RowCache] = {}  # (seq, layer) -> its host rows on the device
        self._tables: dict[int, tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]] = {}  # seq -> device block table
        self._reads: dict[int, tuple[int, torch.Tensor]] = {}  # seq -> (blocks counted, reads per block) of this step
        self._next_seq = 0
        self._free_ids = np.empty(0, dtype=np.int64)  # recycled block ids (stack)
        self._next_id = 0
        self._clock = 0

    def _policy(self, policy: str | EvictionPolicy, what: str) -> EvictionPolicy:
        p = make_policy(policy, self.blocks)
        if p.offline:
            raise ConfigError(f"KVStore.{what}={p.name!r} is an offline policy (replay only)")
        return p

    # ================================================================== sequences
    def create(self, seq_id: int | None = None) -> int:
        """Start an empty sequence; returns its id (``seq_id`` if given and unused)."""
        if seq_id is None:
            while self._next_seq in self._seqs:
                self._next_seq += 1
            seq_id = self._next_seq
        else:  # block metadata stores the owner as int64
            seq_id = validate.integer(seq_id, "sequence id", lo=0, hi=validate.INT64_MAX + 1)
        if seq_id in self._seqs:
            raise ConfigError(f"sequence {seq_id} already exists")
        self._seqs[seq_id] = _Seq(self.spec.num_layers)
        if self.pq is not None:
            self._pq[seq_id] = PQSequenceIndex(
                self.spec, self.pq, lambda layer, s=seq_id: self._layer_keys(s, layer),
                key_gather=lambda layer, positions, s=seq_id: self.gather_keys(s, layer, positions), checks=self.checks,
            )
        return seq_id

    def fork(self, seq: int) -> int:
        """A new sequence sharing ``seq``'s full blocks (refcounted); its partial last block is copied."""
        s = self._seq(seq)
        if np.any(s.layer_lens != s.layer_lens[0]):
            raise BlockStateError(f"sequence {seq}: cannot fork mid-step, layers hold {s.layer_lens.tolist()} tokens")
        n = int(s.layer_lens[0])
        full = n // self.spec.block_size
        partial = n % self.spec.block_size
        if partial:  # the copy needs the source block on the device and one free device slot
            src = s.ids[full : full + 1]
            self._ensure_device(src, extra=1, protected=src, allow_recompute=True)
        child_id = self.create()
        child = self._seqs[child_id]
        shared = s.ids[:full]
        self.blocks.refcount[shared] += 1
        child.push(shared)
        if partial:
            new = self._new_blocks(child_id, full, 1)
            dst = self.blocks.dev_slot[new]
            self.device_pool.kv[int(dst[0])].copy_(self.device_pool.kv[int(self.blocks.dev_slot[s.ids[full]])])
            self._set_filled(new, np.array([partial]), np.array([partial]))
            child.push(new)
        child.layer_lens[:] = n
        if self.pq is not None and n:
            for layer in range(self.spec.num_layers):
                self._pq[child_id].add(layer, self._layer_keys(child_id, layer))
        return child_id

    def free(self, seq: int) -> None:
        """Release a sequence; blocks no other sequence holds are freed in every tier."""
        s = self._seq(seq)
        ids = s.ids
        b = self.blocks
        b.refcount[ids] -= 1
        self._release_blocks(ids[b.refcount[ids] == 0])
        del self._seqs[seq]
        self._pq.pop(seq, None)
        for layer in range(self.spec.num_layers):
            self._row_caches.pop((seq, layer), None)
        self._tables.pop(seq, None)
        self._reads.pop(seq, None)
        # Shared blocks this sequence created now belong to a surviving holder (recompute asks it).
        orphans = ids[(b.refcount[ids] > 0) & (b.seq[ids] == seq)]
        for other_id, other in self._seqs.items():
            if not orphans.size:
                break
            held = np.isin(orphans, other.ids)
            b.seq[orphans[held]] = other_id
            orphans = orphans[~held]

    def __contains__(self, seq: int) -> bool:
        return validate.is_integer(seq) and int(seq) in self._seqs

    @property
    def sequences(self) -> list[int]:
        return list(self._seqs)

    def num_tokens(self, seq: int, layer: int | None = None) -> int:
        """Tokens of ``seq`` written in every layer (or in ``layer``)."""
        s = self._seq(seq)
        if layer is None:
            return int(s.layer_lens.min())
        return int(s.layer_lens[self._layer(layer)])

    def block_table(self, seq: int) -> torch.Tensor:
        """Block ids of ``seq`` in token order: LongTensor ``[num_blocks]`` (CPU, a copy)."""
        return torch.from_numpy(self._seq(seq).ids.copy())

    def device_block_table(self, seq: int) -> torch.Tensor:
        """Device-pool slot of each block of ``seq`` (``-1`` where not resident): int32 ``[num_blocks]``
        on the device, the block table attention kernels read."""
        slots = self.blocks.dev_slot[self._seq(seq).ids].astype(np.int32)
        return torch.from_numpy(slots).to(self.device, non_blocking=True)

    # ================================================================== append
    def append(self, seq: int, k: torch.Tensor, v: torch.Tensor, *, layer: int | None = None) -> None:
        """Append K/V of new tokens to ``seq``.

        All layers at once: ``k, v: [num_layers, T, Hkv, D]`` (``layer=None``); one layer:
        ``k, v: [T, Hkv, D]`` with ``layer=l`` (call once per layer; a sequence's length is the
        minimum over layers). Works for a prefill chunk (T large) and a decode token (T = 1).
        Allocates device blocks as needed, evicting through the device policy when the tier is full.
        """
        s = self._seq(seq)
        spec = self.spec
        if layer is None:
            expect = (spec.num_layers, None, spec.num_kv_heads, spec.head_dim)
            lens = s.layer_lens
            if np.any(lens != lens[0]):
                raise BlockStateError(
                    f"sequence {seq}: all-layer append while layers hold different token counts {lens.tolist()}"
                )
        else:
            layer = self._layer(layer)
            expect = (None, spec.num_kv_heads, spec.head_dim)
            lens = s.layer_lens[layer : layer + 1]
        where = f"appended to sequence {seq}" + ("" if layer is None else f", layer {layer},")
        self._check_kv(k, "k", expect, where)
        self._check_kv(v, "v", expect, where)
        if k.shape != v.shape:
            raise ShapeError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
        t = k.shape[-3]
        if t == 0:
            return
        start = int(lens[0])
        end = start + t
        bs = spec.block_size
        first, last = start // bs, (end - 1) // bs
        ids = s.ids
        existing = ids[first : min(last + 1, s.num_blocks)]
        n_new = last + 1 - max(first, s.num_blocks)
        # Blocks past the end of the table (a layer running ahead) get allocated now.
        self._ensure_device(existing, extra=max(n_new, 0), protected=existing, allow_recompute=True)
        if n_new > 0:
            s.push(self._new_blocks(seq, s.num_blocks, n_new))
        targets = s.ids[first : last + 1]
        self._write(targets, start - first * bs, k, v, layer)
        if layer is None:
            s.layer_lens += t
        else:
            s.layer_lens[layer] += t
        self._invalidate_host(targets)
        self._update_filled(s, first, targets)
        self._touch(targets)
        if self.pq is not None:  # after the write, so a (re-)training reads the new keys too
            index = self._pq[seq]
            if layer is None:
                for layer_id in range(spec.num_layers):
                    index.add(layer_id, k[layer_id].transpose(0, 1))
            else:
                index.add(layer, k.transpose(0, 1))

    # ================================================================== selection
    def select(self, seq: int, layer: int, queries: torch.Tensor, budget: Budget) -> Selection:
        """Tokens of ``seq`` that ``queries: [Hq, D]`` attend to in ``layer`` (PQCache selection).

        Sinks + recent window + the top-k by ADC score within ``budget`` (tokens, or a fraction
        of the sequence). Returns a Selection: ``positions [Hkv, S]`` sorted per KV head and the
        ``blocks`` (indices into :meth:`block_table`) they fall in, which
        :meth:`ensure_resident` brings to the device before attention.
        """
        spec = self.spec
        if not isinstance(queries, torch.Tensor) or tuple(queries.shape) != (spec.num_q_heads, spec.head_dim):
            got = tuple(queries.shape) if isinstance(queries, torch.Tensor) else validate.show(queries)
            raise ShapeError(f"select: queries must be a tensor [{spec.num_q_heads}, {spec.head_dim}] (Hq, D), got {got}")
        return self.select_many([seq], layer, queries.unsqueeze(0), [budget])[0]

    def _check_queries(self, q: torch.Tensor, what: str) -> None:
        """Queries (already shape-checked) hold the store's dtype on its device and need no grad:
        kvstore is inference-only and never casts silently."""
        if q.dtype != self.spec.dtype or q.device != self.device:
            raise ShapeError(f"{what}: queries are {q.dtype} on {q.device}, the store holds {self.spec.dtype} on {self.device} (no silent casts)")
        if q.requires_grad:
            raise ShapeError(f"{what}: queries require grad; kvstore is inference-only, pass them detached (or under torch.no_grad())")

    def select_many(self, seqs, layer: int, queries: torch.Tensor, budgets) -> list[Selection]:
        """:meth:`select` for a batch of sequences of different lengths (``queries: [B, Hq, D]``), scored together."""
        if self.pq is None:
            raise ConfigError("select: this KVStore has no PQ index (construct it with pq=PQConfig())")
        layer = self._layer(layer)
        if not isinstance(seqs, (list, tuple)) or not isinstance(budgets, (list, tuple)):
            raise ShapeError(f"select_many: seqs and budgets must be lists, got {validate.show(seqs)} and {validate.show(budgets)}")
        for s in seqs:
            self._seq(s)  # UnknownSequenceError for a bad id
        seqs = [int(s) for s in seqs]
        spec = self.spec
        want = (len(seqs), spec.num_q_heads, spec.head_dim)
        if not isinstance(queries, torch.Tensor) or tuple(queries.shape) != want:
            got = tuple(queries.shape) if isinstance(queries, torch.Tensor) else validate.show(queries)
            raise ShapeError(f"select_many: queries must be a tensor {list(want)} (B, Hq, D), got {got}")
        if len(budgets) != len(seqs):
            raise ShapeError(f"select_many: {len(budgets)} budgets for {len(seqs)} sequences")
        self._check_queries(queries, "select_many")
        return select_batch([self._pq[s] for s in seqs], layer, queries, list(budgets))

    def gather_keys(self, seq: int, layer: int, positions: torch.Tensor) -> torch.Tensor:
        """Keys of ``seq`` in ``layer`` at per-head ``positions: [Hkv, C]`` -> ``[Hkv, C, D]`` on the
        device, read where the blocks lie (what exact re-ranking reads; not an access). A
        position of -1 reads nothing (a zero key)."""
        return self.fetch(seq, layer, positions, values=False, access=False)[0]

    # ================================================================== fetch and attention
    def fetch(
        self, seq: int, layer: int, positions: torch.Tensor, *, values: bool = True, access: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """K (and V) of ``seq`` in ``layer`` at per-head token ``positions``: the sparse read of a decode step.

        Args:
            positions: ``[Hkv, S]`` integer token positions (on the device, or on the CPU), -1
                for none (a zero row).
            values: read V too.
            access: count the read for the eviction policies (at :meth:`end_step` when checks
                are deferred).

        Returns:
            ``k, v: [Hkv, S, D]`` on the device (``v`` None without ``values``). Only layer
            ``layer``'s rows move: from a block's device copy, else straight from its host copy
            (the mover counts those bytes), never whole blocks. Dropped blocks the positions
            touch are recomputed into the device tier first (a sync: the positions are read).
        """
        s = self._seq(seq)
        layer = self._layer(layer)
        Hkv = self.spec.num_kv_heads
        if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.shape[0] != Hkv:
            shape = tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
            raise ShapeError(f"fetch: positions must be a tensor [{Hkv}, S], got {shape}")
        if positions.dtype.is_floating_point or positions.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise ShapeError(f"fetch: positions must be integers, got {positions.dtype}")
        if positions.device != self.device and positions.device.type != "cpu":
            raise ShapeError(f"fetch: positions on {positions.device}, expected the store's device ({self.device}) or the CPU")
        if positions.device != self.device:
            positions = positions.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else positions.to(self.device)
        positions = positions.long()
        n = int(s.layer_lens[layer])
        self._check_range(positions, -1, n, f"fetch: sequence {seq} layer {layer}: positions")
        ids = s.ids
        b = self.blocks
        if np.any((b.dev_slot[ids] < 0) & (b.host_slot[ids] < 0)):
            touched = np.unique(positions[positions >= 0].cpu().numpy() // self.spec.block_size)
            touched = ids[touched[touched < ids.size]]  # out-of-range positions raise at the range check
            self._ensure_resident_ids(touched[(b.dev_slot[touched] < 0) & (b.host_slot[touched] < 0)])
        dev_slot, host_slot = self._device_table(seq)
        cache = None
        if self.row_cache and self.host_pool.num_slots:
            cache = self._row_caches.get((seq, layer))
            if cache is None:
                cache = self._row_caches[seq, layer] = RowCache(self.row_cache, Hkv, self.spec.head_dim, self.spec.dtype, self.device)
        k, v = self.mover.gather_rows(
            self.device_pool, self.host_pool, layer, dev_slot, host_slot, positions, values=values, cache=cache, num_tokens=n,
        )
        if access:
            self._note_reads(seq, positions)
        return k, v

    def attend(
        self, seq: int, layer: int, q: torch.Tensor, selection: Selection | torch.Tensor | None = None, *,
        scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of decode queries over ``seq``'s layer ``layer``.

        Args:
            q: ``[Tq, Hq, D]``, the sequence's last Tq tokens (already appended).
            selection: None for every token (exact: missing blocks are reloaded or recomputed,
                in chunks the device tier holds, and the chunks merged by log-sum-exp); a
                :class:`~kvstore.pq.select.Selection` or positions ``[Hkv, S]`` (no -1) to attend
                to those tokens only (each KV head its own; every selected token is visible to
                every query): the rows are read by :meth:`fetch`, one layer only.
            scale: softmax scale (default ``D ** -0.5``).

        Returns:
            ``out [Tq, Hq, D]`` in q's dtype and ``lse [Tq, Hq]`` float32 (natural log).
        """
        s = self._seq(seq)
        layer = self._layer(layer)
        if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.shape[2] != self.spec.head_dim or q.shape[1] != self.spec.num_q_heads:
            shape = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
            raise ShapeError(f"attend: q must be [Tq, {self.spec.num_q_heads}, {self.spec.head_dim}], got {shape}")
        self._check_queries(q, "attend")
        check_scale(scale)  # before any block moves
        n = int(s.layer_lens[layer])
        if not 1 <= q.shape[0] <= n:
            raise ShapeError(f"attend: {q.shape[0]} queries but sequence {seq} holds {n} tokens in layer {layer}")
        self.checks.add((~torch.isfinite(q)).sum(), partial(_nonfinite, f"attend: queries for sequence {seq} layer {layer}", ""))
        if selection is None:
            return self._attend_all(seq, layer, q, n, scale)
        positions = selection.positions if isinstance(selection, Selection) else selection
        if isinstance(positions, torch.Tensor) and not positions.dtype.is_floating_point and positions.numel():
            self._check_range(positions, 0, n, f"attend: sequence {seq} layer {layer}: positions")
        k, v = self.fetch(seq, layer, positions)
        return multi_segment_attention(q, [(k.transpose(0, 1), v.transpose(0, 1))], causal_last=False, scale=scale)

    def _attend_all(self, seq: int, layer: int, q: torch.Tensor, n: int, scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over the first ``n`` tokens of ``layer``.

        A sequence the device tier holds is brought there whole (one :meth:`_ensure_device`:
        host copies reloaded, dropped blocks recomputed, all or nothing) and read in place. A
        longer one is read where it lies and changes no tier: its device blocks in place, the
        others' layer-``layer`` rows in chunks of the device tier's size (host rows straight from
        the host copy, dropped blocks recomputed and not kept, as :meth:`read` does), the blocks
        holding the queries last (the causal mask is bottom-right), merged by log-sum-exp. The
        blocks count as read once everything was read, so a recompute callable that raises or
        returns a bad block in any chunk leaves the store exactly as it was.
        """
        bs, room = self.spec.block_size, self.device_pool.num_slots
        ids = self._seq(seq).ids[: -(-n // bs)]
        b = self.blocks
        k_cache, v_cache = self.device_pool.layer_view(layer, 0), self.device_pool.layer_view(layer, 1)
        if np.all(b.dev_slot[ids] >= 0) or ids.size <= room:
            self._ensure_resident_ids(ids)
            segments = BlockSegments.build(b.dev_slot[ids], [0, ids.size], [n - (ids.size - 1) * bs], block_size=bs, device=self.device)
            return paged_attention(q, k_cache, v_cache, segments, causal_last=True, scale=scale)
        tail = (n - q.shape[0]) // bs  # first block holding a query
        body = np.arange(tail)
        on_dev = body[b.dev_slot[ids[body]] >= 0]  # full blocks: only the sequence's last block may be partial
        elsewhere = body[b.dev_slot[ids[body]] < 0]
        states = []
        if on_dev.size:
            segments = BlockSegments.build(b.dev_slot[ids[on_dev]], [0, on_dev.size], [bs], block_size=bs, device=self.device)
            states.append(paged_attention(q, k_cache, v_cache, segments, causal_last=False, scale=scale))
        for i in range(0, elsewhere.size, room):
            k, v = self._layer_rows(seq, layer, elsewhere[i : i + room], n)
            states.append(multi_segment_attention(q, [(k, v)], causal_last=False, scale=scale))
        k, v = self._layer_rows(seq, layer, np.arange(tail, ids.size), n)
        states.append(multi_segment_attention(q, [(k, v)], causal_last=True, scale=scale))
        self._touch(ids)
        out, lse = merge_states(torch.stack([o for o, _ in states], 1), torch.stack([l for _, l in states], 1))
        return out.to(q.dtype), lse

    def _layer_rows(self, seq: int, layer: int, index: np.ndarray, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V rows ``[T, Hkv, D]`` of layer ``layer`` of the blocks at table indices ``index``
        (their tokens below ``n``, in order), read where they lie: the device copy, else the host
        copy, else recomputed (not kept). Changes nothing (not an access)."""
        bs = self.spec.block_size
        starts = index * bs
        counts = np.minimum(bs, n - starts)
        first_row = np.cumsum(counts) - counts
        tokens = np.repeat(starts - first_row, counts) + np.arange(int(counts.sum()))
        positions = torch.from_numpy(tokens).to(self.device).expand(self.spec.num_kv_heads, -1).contiguous()
        dev_slot, host_slot = self._device_table(seq)
        k, v = self.mover.gather_rows(self.device_pool, self.host_pool, layer, dev_slot, host_slot, positions, num_tokens=n)
        k, v = k.transpose(0, 1), v.transpose(0, 1)
        ids = self._seqs[seq].ids[index]
        gone = np.flatnonzero((self.blocks.dev_slot[ids] < 0) & (self.blocks.host_slot[ids] < 0))
        for j in gone.tolist():
            kv = self._recompute_block(int(ids[j]))
            rows = slice(int(first_row[j]), int(first_row[j] + counts[j]))
            k[rows], v[rows] = kv[layer, 0, : counts[j]], kv[layer, 1, : counts[j]]
        return k, v

    def end_step(self) -> None:
        """Close a decode step: read every deferred check and the step's attention reads at once
        (one sync on CUDA; nothing to do without deferred checks), tell the eviction policies
        which blocks were read, re-train drifting PQ layers, and raise the first error found
        (NonFiniteError, OutOfRangeError) after all of that."""
        self.checks.flush()

    def _check_range(self, values: torch.Tensor, lo: int, hi: int, what: str) -> None:
        """OutOfRangeError (deferred: see the module docstring) naming the values outside ``[lo, hi)``."""
        if not values.numel():
            return
        bad = (values < lo) | (values >= hi)
        far = torch.iinfo(torch.int64)
        v = values.long()
        summary = torch.stack([bad.sum(), torch.where(bad, v, far.max).min(), torch.where(bad, v, far.min).max()])
        self.checks.add(summary, partial(_out_of_range, f"{what} outside [{lo}, {hi})"))

    def _device_table(self, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dev_slot, host_slot)`` of ``seq``'s blocks as int64 device tensors, uploaded again
        only when the sequence's residency changed (a comparison of two host arrays)."""
        ids = self._seqs[seq].ids
        dev, host = self.blocks.dev_slot[ids], self.blocks.host_slot[ids]
        cached = self._tables.get(seq)
        if cached is None or not (np.array_equal(cached[0], dev) and np.array_equal(cached[1], host)):
            cached = (dev, host, upload(dev, self.device), upload(host, self.device))
            self._tables[seq] = cached
        return cached[2], cached[3]

    def _note_reads(self, seq: int, positions: torch.Tensor) -> None:
        """Count the blocks ``positions: [Hkv, S]`` read (device-side until :meth:`end_step`)."""
        s = self._seqs[seq]
        valid = positions >= 0
        blocks = (positions.clamp_min(0) // self.spec.block_size).reshape(-1)
        if self.checks.immediate:
            self._touch(s.ids[np.unique(blocks[valid.reshape(-1)].cpu().numpy())])
            return
        counted = self._reads.get(seq)
        if counted is None or counted[0] != s.num_blocks:
            counted = (s.num_blocks, torch.zeros(s.num_blocks, dtype=torch.int32, device=self.device))
            self._reads[seq] = counted
            self.checks.add(counted[1], partial(self._touch_read, seq, counted[1]))
        counted[1].index_add_(0, blocks, valid.reshape(-1).to(torch.int32))

    def _touch_read(self, seq: int, counts_tensor: torch.Tensor, counts: np.ndarray) -> None:
        """The step's reads of ``seq`` reach the policies (a callback of :meth:`end_step`)."""
        if self._reads.get(seq, (0, None))[1] is counts_tensor:
            del self._reads[seq]
        s = self._seqs.get(seq)
        if s is not None and counts.any():
            ids = s.ids[: counts.size][counts[: s.num_blocks] > 0]
            self._touch(ids)

    def _layer_keys(self, seq: int, layer: int) -> torch.Tensor:
        """All keys of ``seq`` in ``layer``: ``[Hkv, n, D]``."""
        return self.read(seq, layer=layer)[0].transpose(0, 1)

    def _check_kv(self, x: torch.Tensor, name: str, expect: tuple, where: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise ShapeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != len(expect) or any(e is not None and e != got for e, got in zip(expect, x.shape)):
            want = "[" + ", ".join("T" if e is None else str(e) for e in expect) + "]"
            raise ShapeError(f"{name} has shape {tuple(x.shape)}, expected {want}")
        if x.dtype != self.spec.dtype:
            raise ShapeError(f"{name} has dtype {x.dtype}, the store holds {self.spec.dtype} (no silent casts)")
        if x.device != self.device:
            raise ShapeError(f"{name} is on {x.device}, the device tier is on {self.device}")
        if x.requires_grad:  # rejected, not detached: writing it would make the pool part of an autograd graph
            raise ShapeError(f"{name} requires grad; the store keeps no autograd graph: pass {name}.detach()")
        if not self.allow_nonfinite and x.numel():
            self.checks.add((~torch.isfinite(x)).sum(), partial(_nonfinite, f"{name} {where}", "pass allow_nonfinite=True to accept them"))

    def _write(self, targets: np.ndarray, offset: int, k: torch.Tensor, v: torch.Tensor, layer: int | None) -> None:
        """Write ``T`` tokens into device blocks ``targets``, starting ``offset`` tokens into the first.

        One token (a decode step) is written with plain indexing; more as whole block rows (one
        ``index_put`` per K and V) plus the partial blocks at either end token by token. Slot
        indices reach the device without a host wait.
        """
        bs = self.spec.block_size
        t = k.shape[-3]
        kv = self.device_pool.kv
        dev_slots = self.blocks.dev_slot[targets]
        if t == 1:
            slot = int(dev_slots[0])
            for i, x in enumerate((k, v)):
                if layer is None:
                    kv[slot, :, i, offset] = x[:, 0]
                else:
                    kv[slot, layer, i, offset] = x[0]
            return
        slots = upload(dev_slots, self.device)
        head = min(t, (bs - offset) % bs)  # tokens completing a partially filled first block
        n_full = (t - head) // bs
        spans = [(0, head), (head + n_full * bs, t)]  # token ranges written token by token
        if n_full:
            rows = slots[int(head > 0) : int(head > 0) + n_full]
            for i, x in enumerate((k, v)):
                mid = x.narrow(-3, head, n_full * bs)
                if layer is None:  # [L, n*bs, H, D] -> [n, L, bs, H, D]
                    kv[rows, :, i] = mid.unflatten(1, (n_full, bs)).transpose(0, 1)
                else:  # [n*bs, H, D] -> [n, bs, H, D]
                    kv[rows, layer, i] = mid.unflatten(0, (n_full, bs))
        for lo, hi in spans:
            if hi <= lo:
                continue
            tok = torch.arange(offset + lo, offset + hi, device=self.device)
            row, col = slots[tok // bs], tok % bs
            for i, x in enumerate((k, v)):
                part = x.narrow(-3, lo, hi - lo)
                if layer is None:  # advanced indices around a slice: the indexed view is [T, L, Hkv, D]
                    kv[row, :, i, col] = part.transpose(0, 1)
                else:
                    kv[row, layer, i, col] = part

    def _update_filled(self, s: _Seq, first: int, targets: np.ndarray) -> None:
        bs = self.spec.block_size
        starts = (first + np.arange(targets.size)) * bs
        lo, hi = int(s.layer_lens.min()), int(s.layer_lens.max())
        self._set_filled(targets, np.clip(lo - starts, 0, bs), np.clip(hi - starts, 0, bs))

    def _set_filled(self, ids: np.ndarray, complete: np.ndarray, filled: np.ndarray) -> None:
        b = self.blocks
        b.num_tokens[ids] = complete
        b.filled[ids] = filled
        b.recompute_cost[ids] = self.cost.recompute_flops(b.position[ids], filled)

    # ================================================================== reads
    def _where(self, ids: np.ndarray) -> tuple[np.ndarray, ...]:
        """Where blocks ``ids`` (any shape) are read from: ``(dev_slot, host_slot, on_dev, on_host,
        gone)``, the device copy first, else the host copy, else neither (dropped)."""
        dev = self.blocks.dev_slot[ids]
        host = self.blocks.host_slot[ids]
        on_dev = dev >= 0
        on_host = ~on_dev & (host >= 0)
        return dev, host, on_dev, on_host, ~on_dev & ~on_host

    def read(self, seq: int, positions=None, *, layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``seq`` at token ``positions`` (default: all), wherever the blocks live.

        Returns ``k, v: [num_layers, T, Hkv, D]`` (``layer=None``) or ``[T, Hkv, D]``, on the
        device tier's device. Host blocks are read in place (not loaded); dropped blocks are
        recomputed (and not kept). Counts as an access for the eviction policies.
        """
        s = self._seq(seq)
        n = int(s.layer_lens.min()) if layer is None else int(s.layer_lens[self._layer(layer)])
        if positions is None:
            pos = np.arange(n, dtype=np.int64)
        else:
            pos = validate.index_array(positions, f"sequence {seq}: positions", lo=0, hi=n)
        bs = self.spec.block_size
        bidx = pos // bs
        ids = s.ids[bidx]
        offs = torch.from_numpy(pos % bs)
        spec = self.spec
        out = torch.empty((spec.num_layers, 2, pos.size, spec.num_kv_heads, spec.head_dim), dtype=spec.dtype, device=self.device)
        dev, host, on_dev, on_host, gone = self._where(ids)
        if on_dev.any():
            sel = torch.from_numpy(np.flatnonzero(on_dev)).to(self.device)
            slots = torch.from_numpy(dev[on_dev]).to(self.device)
            out[:, :, sel] = self.device_pool.kv[slots, :, :, offs[on_dev].to(self.device)].permute(1, 2, 0, 3, 4)
        if on_host.any():
            self.mover.wait_writes(self.host_pool, host[on_host])
            sel = torch.from_numpy(np.flatnonzero(on_host)).to(self.device)
            rows = self.host_pool.kv[torch.from_numpy(host[on_host]), :, :, offs[on_host]]
            out[:, :, sel] = rows.permute(1, 2, 0, 3, 4).to(self.device)
        if gone.any():
            for block in np.unique(ids[gone]).tolist():
                kv = self._recompute_block(block)
                where = np.flatnonzero(ids == block)
                out[:, :, torch.from_numpy(where).to(self.device)] = kv[:, :, torch.from_numpy(pos[where] % bs).to(self.device)]
        self._touch(np.unique(ids))
        if layer is None:
            return out[:, 0], out[:, 1]
        return out[layer, 0], out[layer, 1]

    def residency(self, blocks) -> np.ndarray:
        """Fastest tier holding each block: int8 ``TIER_DEVICE`` (0), ``TIER_HOST`` (1) or ``TIER_NONE`` (3, dropped)."""
        ids = self._check_blocks(blocks)
        return self.blocks.tier[ids].copy()

    def memory(self) -> dict[str, TierUsage]:
        """Blocks and bytes used per tier."""
        return {
            p.name: TierUsage(p.name, p.num_slots, p.num_used, p.bytes_total, p.bytes_used)
            for p in (self.device_pool, self.host_pool)
        }

    def index_bytes(self) -> int:
        """Device bytes of the PQ indexes: uint8 codes and outlier positions (0 without ``pq``)."""
        total = 0
        for seq in self._pq.values():
            for index in seq.indexes:
                if index.is_trained:
                    total += index.codes.numel() + 8 * index.outlier_slots.numel()
        return total

    def row_cache_bytes(self) -> int:
        """Device bytes of the row caches (rows and their maps; 0 without ``row_cache``)."""
        return sum(cache.nbytes for cache in self._row_caches.values())

    # ================================================================== tier moves
    def offload(self, blocks) -> TransferHandle:
        """Move device blocks to the host tier (freeing their device slots).

        Blocks already holding a clean host copy need no copy. Makes room in the host tier
        through its policy (dropping host victims only when ``recompute`` is set).
        """
        ids = np.unique(self._check_blocks(blocks))
        off = ids[self.blocks.dev_slot[ids] < 0]
        if off.size:
            raise BlockStateError(f"offload: blocks {off[:8].tolist()} are not on the device tier")
        if self.host_pool.num_slots == 0:
            raise CapacityError(f"offload: there is no host tier (host_blocks=0) for {ids.size} blocks")
        need_copy = ids[self.blocks.host_slot[ids] < 0]
        self._drop_from_host(self._host_room(need_copy.size, protected=ids))
        handle = self._copy_to_host(need_copy)
        self._free_device(ids)
        return handle

    def load(self, blocks) -> TransferHandle:
        """Bring blocks to the device tier from their host copies (kept: they stay clean).

        Blocks already on the device are left alone. Raises BlockStateError if a block has no
        device and no host copy (it was dropped: see :meth:`ensure_resident`).
        """
        ids = np.unique(self._check_blocks(blocks))
        b = self.blocks
        gone = ids[(b.dev_slot[ids] < 0) & (b.host_slot[ids] < 0)]
        if gone.size:
            raise BlockStateError(f"load: blocks {gone[:8].tolist()} have no host copy (dropped); use ensure_resident()")
        return self._ensure_device(ids, protected=ids, allow_recompute=False)

    def ensure_resident(self, blocks) -> TransferHandle:
        """Make blocks device-resident (load host copies, recompute dropped blocks) to be read:
        an access for the device tier's policy."""
        return self._ensure_resident_ids(np.unique(self._check_blocks(blocks)))

    def _ensure_resident_ids(self, ids: np.ndarray) -> TransferHandle:
        handle = self._ensure_device(ids, protected=ids, allow_recompute=True)
        self._touch(ids)
        return handle

    def drop(self, blocks) -> None:
        """Discard every copy of the blocks; ``recompute`` restores them on next use (lossless mode)."""
        ids = np.unique(self._check_blocks(blocks))
        if self.recompute is None:
            raise ConfigError("drop: this KVStore has no recompute callable, dropping would lose data")
        self._free_device(ids[self.blocks.dev_slot[ids] >= 0])
        self._drop_from_host(ids[self.blocks.host_slot[ids] >= 0])

    # ================================================================== internals: blocks
    def _seq(self, seq: int) -> _Seq:
        if not validate.is_integer(seq):  # 0.0 and True would find sequence 0 and 1 in the dict
            raise UnknownSequenceError(f"sequence id {validate.show(seq)} must be an integer (got {type(seq).__name__})")
        try:
            return self._seqs[int(seq)]
        except KeyError:
            raise UnknownSequenceError(f"unknown sequence {int(seq)} (never created or already freed)") from None

    def _layer(self, layer: int) -> int:
        return validate.integer(layer, "layer", lo=0, hi=self.spec.num_layers, error=OutOfRangeError)

    def _check_blocks(self, blocks) -> np.ndarray:
        ids = validate.index_array(blocks, "block ids", lo=0, hi=self._next_id)
        dead = ids[self.blocks.refcount[ids] <= 0]
        if dead.size:
            raise BlockStateError(f"block ids {dead[:8].tolist()} are not live (freed)")
        return ids

    def _new_blocks(self, seq: int, first_index: int, n: int) -> np.ndarray:
        """Allocate ``n`` block ids for ``seq`` at block indices ``first_index..`` with device slots
        (the caller made room) and register them with the device policy."""
        take = min(n, self._free_ids.size)
        ids = np.empty(n, dtype=np.int64)
        if take:
            ids[:take] = self._free_ids[self._free_ids.size - take :][::-1]
            self._free_ids = self._free_ids[: self._free_ids.size - take]
        fresh = n - take
        if fresh:
            ids[take:] = np.arange(self._next_id, self._next_id + fresh)
            self._next_id += fresh
            self.blocks.reserve(self._next_id)
        b = self.blocks
        b.refcount[ids] = 1
        b.seq[ids] = seq
        b.position[ids] = (first_index + np.arange(n)) * self.spec.block_size
        b.size_bytes[ids] = self.spec.bytes_per_block
        # Without a host tier an evicted block can only be recomputed: no reload to fall back on,
        # so a cost-aware policy sees the position-dependent recompute cost alone.
        b.reload_cost[ids] = self.cost.reload_seconds(self.spec.bytes_per_block) if self.host_pool.num_slots else np.inf
        b.num_tokens[ids] = 0
        b.filled[ids] = 0
        b.access_count[ids] = 0
        # each block extends the one before it: the sequence's block at first_index - 1 (for a
        # fork, the last block it shares), then each new block the previous new one
        s = self._seqs[seq]
        first_parent = int(s.ids[first_index - 1]) if 0 < first_index <= s.num_blocks else -1
        b.link(ids, np.concatenate([[first_parent], ids[:-1]]))
        b.dev_slot[ids] = self.device_pool.allocate(ids)
        b.tier[ids] = DEVICE
        self.device_policy.on_insert(ids)
        return ids

    def _release_blocks(self, ids: np.ndarray) -> None:
        """Free blocks no sequence holds any more: every copy, then the id."""
        if not ids.size:
            return
        b = self.blocks
        self._free_device(ids[b.dev_slot[ids] >= 0])
        self._drop_from_host(ids[b.host_slot[ids] >= 0])
        b.reset(ids)
        self._free_ids = np.concatenate([self._free_ids, ids])

    def _touch(self, ids: np.ndarray) -> None:
        b = self.blocks
        self._clock += 1
        b.last_access[ids] = self._clock
        b.access_count[ids] += 1
        b.reads[ids] += 1
        on_dev = ids[b.dev_slot[ids] >= 0]
        if on_dev.size:
            self.device_policy.on_access(on_dev)
        on_host = ids[(b.dev_slot[ids] < 0) & (b.host_slot[ids] >= 0)]
        if on_host.size:
            self.host_policy.on_access(on_host)

    def _set_tier(self, ids: np.ndarray) -> None:
        b = self.blocks
        b.tier[ids] = np.where(b.dev_slot[ids] >= 0, DEVICE, np.where(b.host_slot[ids] >= 0, HOST, NONE))

    # ================================================================== internals: tiers
    def _policy_victims(self, pool: BlockPool, policy: EvictionPolicy, need: int, protected: np.ndarray) -> np.ndarray:
        """``need`` victims named by ``policy``; raises CapacityError (nothing changed) if it cannot."""
        if need <= 0:
            return np.empty(0, dtype=np.int64)
        slots = self.blocks.dev_slot if pool is self.device_pool else self.blocks.host_slot
        victims = checked_victims(policy, need, protected, known=lambda ids: (ids < slots.size) & (slots[np.minimum(ids, slots.size - 1)] >= 0))
        if victims.size < need:
            raise CapacityError(
                f"{pool.name} tier full: {pool.num_free} of {pool.num_slots} blocks free, {need} more needed, "
                f"but only {victims.size} of its {pool.num_used} resident blocks can be evicted "
                f"({np.asarray(protected).size} protected by the operation)"
            )
        return victims

    def _host_room(self, n: int, protected: np.ndarray) -> np.ndarray:
        """Host blocks to drop so that ``n`` host slots are free.

        Clean duplicates (blocks also on the device) go first: dropping them loses nothing.
        Then the host policy names victims, whose last copy is dropped: that needs
        ``recompute``, else CapacityError (nothing changed).
        """
        pool = self.host_pool
        need = n - pool.num_free
        if need <= 0:
            return np.empty(0, dtype=np.int64)
        b = self.blocks
        held = pool.owner[pool.owner >= 0]
        dual = held[(b.dev_slot[held] >= 0) & ~np.isin(held, protected)][:need]
        if dual.size == need:
            return dual
        if self.recompute is None:
            raise CapacityError(
                f"host tier full: need {n} free blocks, {pool.num_free} of {pool.num_slots} are free, "
                f"{dual.size} hold clean duplicates, and without a recompute callable nothing else can be dropped"
            )
        return np.concatenate([dual, self._policy_victims(pool, self.host_policy, need - dual.size, protected)])

    def _make_device_room(self, n: int, protected: np.ndarray) -> None:
        """Free ``n`` device slots. Victims without a host copy are copied to the host tier; when
        there is none (or it is full and cannot drop), they are dropped if ``recompute`` is set."""
        victims = self._policy_victims(self.device_pool, self.device_policy, n - self.device_pool.num_free, protected)
        if not victims.size:
            return
        need_copy = victims[self.blocks.host_slot[victims] < 0]
        if need_copy.size:
            try:
                if not self.host_pool.num_slots:
                    raise CapacityError(
                        f"device tier full ({self.device_pool.num_slots} blocks), there is no host tier, "
                        f"and without a recompute callable {need_copy.size} evicted blocks would be lost"
                    )
                host_drop = self._host_room(need_copy.size, np.union1d(protected, victims))
            except CapacityError:
                if self.recompute is None:
                    raise
            else:
                self._drop_from_host(host_drop)
                self._copy_to_host(need_copy)
        self._free_device(victims)

    def _ensure_device(self, ids: np.ndarray, *, extra: int = 0, protected: np.ndarray, allow_recompute: bool) -> TransferHandle:
        """Bring ``ids`` to the device tier and leave ``extra`` further free device slots.

        All or nothing: dropped blocks are recomputed (and the callable's output validated)
        before anything changes, and room is made (which raises CapacityError before it changes
        anything) before any block moves, so a recompute callable that raises or returns a bad
        block, or a tier that cannot make room, leaves the store as it was. The recomputed
        blocks are held until they are placed (a transient copy of their bytes on the device).
        Each block's tier is updated as its slot changes.
        """
        b = self.blocks
        missing = ids[b.dev_slot[ids] < 0]
        dropped = missing[b.host_slot[missing] < 0]
        if dropped.size and (not allow_recompute or self.recompute is None):
            why = "there is no recompute callable" if self.recompute is None else "this operation only loads host copies"
            raise BlockStateError(f"blocks {dropped[:8].tolist()} were dropped and {why}")
        restored = [self._recompute_block(block) for block in dropped.tolist()]
        self._make_device_room(missing.size + extra, protected)
        handle = TransferHandle()
        from_host = missing[b.host_slot[missing] >= 0]
        if from_host.size:
            slots = self.device_pool.allocate(from_host)
            handle = self.mover.copy(self.host_pool, b.host_slot[from_host], self.device_pool, slots)
            handle.wait()
            b.dev_slot[from_host] = slots
            self._set_tier(from_host)
            self.host_policy.on_remove(from_host)  # the host copy stays, but the device copy now serves hits
            self.device_policy.on_insert(from_host)
        if dropped.size:
            slots = self.device_pool.allocate(dropped)
            for slot, kv in zip(slots.tolist(), restored):
                self.device_pool.kv[slot, :, :, : kv.shape[2]] = kv
            b.dev_slot[dropped] = slots
            self._set_tier(dropped)
            self.device_policy.on_insert(dropped)
        return handle

    def _recompute_block(self, block: int) -> torch.Tensor:
        """``[L, 2, filled, Hkv, D]`` from the recompute callable, on the device, validated: a
        tensor of that shape and the store's dtype that does not require grad (ShapeError), and
        finite unless ``allow_nonfinite`` (NonFiniteError; deferred to :meth:`end_step` with
        deferred checks). Changes nothing; an exception of the callable is raised as a
        RecomputeError naming the block (the callable's exception is its cause)."""
        b = self.blocks
        n = int(b.filled[block])
        seq, start = int(b.seq[block]), int(b.position[block])
        try:
            kv = self.recompute(seq, start, n)
        except Exception as e:
            raise RecomputeError(
                f"recompute({seq}, {start}, {n}) of block {block} raised {type(e).__name__}: {e}"
            ) from e
        spec = self.spec
        want = (spec.num_layers, 2, n, spec.num_kv_heads, spec.head_dim)
        if not isinstance(kv, torch.Tensor) or tuple(kv.shape) != want or kv.dtype != spec.dtype:
            got = (tuple(kv.shape), kv.dtype) if isinstance(kv, torch.Tensor) else type(kv).__name__
            raise ShapeError(f"recompute({seq}, {start}, {n}) returned {got}, expected shape {want} of {spec.dtype}")
        if kv.requires_grad:
            raise ShapeError(f"recompute({seq}, {start}, {n}) returned a tensor that requires grad; return it detached")
        kv = kv.to(self.device)
        if not self.allow_nonfinite:
            self.checks.add(
                (~torch.isfinite(kv)).sum(),
                partial(_nonfinite, f"recompute({seq}, {start}, {n}) output", "the recompute callable returned them"),
            )
        return kv

    def _copy_to_host(self, ids: np.ndarray) -> TransferHandle:
        """Copy device blocks (no host copy yet, room made by the caller) into new host slots."""
        if not ids.size:
            return TransferHandle()
        b = self.blocks
        slots = self.host_pool.allocate(ids)
        handle = self.mover.copy(self.device_pool, b.dev_slot[ids], self.host_pool, slots)
        handle.wait()
        b.host_slot[ids] = slots
        return handle

    def _free_device(self, ids: np.ndarray) -> None:
        if not ids.size:
            return
        b = self.blocks
        self.device_pool.release(b.dev_slot[ids])
        b.dev_slot[ids] = -1
        self.device_policy.on_remove(ids)
        # Blocks left with only a host copy are now served (and evicted) by the host tier.
        host_only = ids[b.host_slot[ids] >= 0]
        if host_only.size:
            self.host_policy.on_insert(host_only)
        self._set_tier(ids)

    def _drop_from_host(self, ids: np.ndarray) -> None:
        if not ids.size:
            return
        b = self.blocks
        tracked = ids[b.dev_slot[ids] < 0]  # the host policy tracks host-only blocks
        self.host_pool.release(b.host_slot[ids])
        b.host_slot[ids] = -1
        if tracked.size:
            self.host_policy.on_remove(tracked)
        self._set_tier(ids)

    def _invalidate_host(self, ids: np.ndarray) -> None:
        stale = ids[self.blocks.host_slot[ids] >= 0]
        self._drop_from_host(stale)

    # ================================================================== consistency
    def check(self) -> None:
        """Raise AssertionError (also under ``python -O``) naming the first broken invariant
        between sequences, block metadata, pools and policies: refcounts equal the references
        from block tables; every slot is owned by the block that names it and no slot leaks;
        every block's tier is the fastest copy it has (``TIER_DEVICE`` iff it has a device
        slot, ``TIER_HOST`` iff only a host slot, ``TIER_NONE`` iff neither); freed ids hold
        nothing and sit once on the free list; each policy tracks exactly its tier's blocks."""
        b = self.blocks

        def require(ok, broken: str) -> None:
            if not ok:
                raise AssertionError(f"KVStore.check: {broken}")

        refs = np.zeros(self._next_id, dtype=np.int64)
        for seq_id, s in self._seqs.items():
            np.add.at(refs, s.ids, 1)
            owned = s.ids[b.seq[s.ids] == seq_id]
            require(
                np.all(b.position[owned] == np.flatnonzero(b.seq[s.ids] == seq_id) * self.spec.block_size),
                f"sequence {seq_id}: a block's position is not its index in the table",
            )
            require(s.num_blocks == self.spec.num_blocks(int(s.layer_lens.max())), f"sequence {seq_id}: table length != tokens")
        live = np.flatnonzero(refs)
        require(np.array_equal(refs, b.refcount[: self._next_id]), "refcount != references from sequence tables")
        require(np.all(np.isin(b.seq[live], list(self._seqs))), "a live block's owner was freed")
        for pool, slot_of in ((self.device_pool, b.dev_slot), (self.host_pool, b.host_slot)):
            pool.check()
            held = live[slot_of[live] >= 0]
            require(np.unique(slot_of[held]).size == held.size, f"{pool.name}: two blocks share a slot")
            require(np.array_equal(pool.owner[slot_of[held]], held), f"{pool.name}: owner map disagrees")
            require(held.size == pool.num_used, f"{pool.name}: {pool.num_used - held.size} leaked slots")
        dev, host = b.dev_slot[live], b.host_slot[live]
        tier = np.where(dev >= 0, DEVICE, np.where(host >= 0, HOST, NONE))
        wrong = live[b.tier[live] != tier]
        require(
            not wrong.size,
            f"blocks {wrong[:8].tolist()} say tiers {b.tier[wrong[:8]].tolist()} but their slots say {tier[b.tier[live] != tier][:8].tolist()}",
        )
        dead = np.setdiff1d(np.arange(self._next_id), live)
        require(np.all(b.dev_slot[dead] == -1) and np.all(b.host_slot[dead] == -1), "freed block still has a copy")
        require(np.all(b.tier[dead] == NONE), "freed block has a tier")
        require(np.unique(self._free_ids).size == self._free_ids.size == dead.size, "block-id free list")
        require(len(self.device_policy) == int((dev >= 0).sum()), "device policy tracks other blocks")
        require(len(self.host_policy) == int(((dev < 0) & (host >= 0)).sum()), "host policy tracks other blocks")
        if self.recompute is None:
            require(np.all((dev >= 0) | (host >= 0)), "a block lost every copy")


def _nonfinite(what: str, hint: str, count: np.ndarray) -> None:
    if count[0]:
        raise NonFiniteError(f"{what} hold {int(count[0])} NaN/Inf values" + (f" ({hint})" if hint else ""))


def _out_of_range(what: str, summary: np.ndarray) -> None:
    count, low, high = (int(x) for x in summary)
    if count:
        raise OutOfRangeError(f"{what}: {count} of them, from {low} to {high}")


def _default_cost(spec: KVSpec) -> CostModel:
    """Cost model for ``spec``: the matching preset's, else derived from the shape (hidden = Hq * D)."""
    from kvstore.spec import MODEL_COSTS, PRESETS, ModelCost

    for name, preset in PRESETS.items():
        if (preset.num_layers, preset.num_kv_heads, preset.num_q_heads, preset.head_dim) == (
            spec.num_layers, spec.num_kv_heads, spec.num_q_heads, spec.head_dim,
        ):
            return CostModel(model=MODEL_COSTS[name])
    hidden = spec.num_q_heads * spec.head_dim
    return CostModel(model=ModelCost(num_params=12 * spec.num_layers * hidden * hidden, hidden_size=hidden, num_layers=spec.num_layers))
