"""BlockPool: one tier's preallocated KV storage, its free list, refcounts and residency map.

Layout: ``kv`` is one tensor ``[num_slots, num_layers, 2, block_size, num_kv_heads, head_dim]``
(``KVSpec.block_shape`` per slot), so a slot's bytes are contiguous across layers and a tier
move is one contiguous copy per block. :meth:`BlockPool.layer_view` gives the per-layer K or
V cache ``[num_slots, block_size, num_kv_heads, head_dim]`` that attention kernels read in
place (a strided view: the slot stride is ``num_layers * 2 * block_size * Hkv * D``).

Invariants (checked by :meth:`check`):
  * a slot is either on the free list (refcount 0, owner -1) or allocated (refcount >= 1);
  * ``free_count + allocated == num_slots`` and no slot is on the free list twice;
  * ``owner[slot]`` is the block id stored in an allocated slot (the residency map; the
    reverse map, block id -> slot, lives with the block metadata in the store).

All bookkeeping is numpy arrays; allocation and release are vectorised (no per-slot loop).
The free list is a LIFO stack: the most recently freed slots are reused first (warm in cache).
"""

from __future__ import annotations

import numpy as np
import torch

from kvstore import validate
from kvstore.errors import BlockStateError, CapacityError, ConfigError, OutOfRangeError
from kvstore.spec import KVSpec

__all__ = ["BlockPool"]

#: host bytes of bookkeeping per slot (refcount int32, owner, pending_write and free-list int64)
_BOOKKEEPING_BYTES = 4 + 3 * 8


class BlockPool:
    """Preallocated storage for ``num_slots`` blocks of ``spec`` on one device.

    Args:
        spec: block shape and dtype.
        num_slots: capacity in blocks (may be 0: a tier that holds nothing).
        device: where ``kv`` lives.
        pin_memory: page-lock a CPU pool (for async host<->device copies); ignored on CUDA.
        name: tier name used in error messages ("device", "host").
        host: the pool is host memory, which the CPU reads only after a host synchronisation
            (default: a CPU pool is). A device tier kept on the CPU passes False, so copies are
            ordered as they would be on a GPU.
    """

    def __init__(
        self,
        spec: KVSpec,
        num_slots: int,
        *,
        device: torch.device | str = "cpu",
        pin_memory: bool = False,
        name: str = "pool",
        host: bool | None = None,
    ) -> None:
        what = f"BlockPool({name})"
        num_slots = validate.tier_blocks(num_slots, f"{what}.num_slots")
        self.spec = spec
        self.name = name
        self.num_slots = num_slots
        self.device = validate.device(device, f"{what}.device", types=("cpu", "cuda", "meta"))
        self.host = self.device.type == "cpu" if host is None else bool(host)
        pin = pin_memory and self.device.type == "cpu" and num_slots > 0
        validate.tier_bytes(num_slots, spec.bytes_per_block + _BOOKKEEPING_BYTES, self.device, f"{name} tier:")
        try:
            self.kv = torch.empty((num_slots, *spec.block_shape), dtype=spec.dtype, device=self.device, pin_memory=pin)
        except (MemoryError, RuntimeError) as e:  # the allocator's refusal (torch raises RuntimeError or OutOfMemoryError)
            raise ConfigError(
                f"{name} tier: cannot allocate {num_slots} blocks x {spec.bytes_per_block} bytes on {self.device} "
                f"({str(e).splitlines()[0]})"
            ) from None
        self.refcount = np.zeros(num_slots, dtype=np.int32)
        self.owner = np.full(num_slots, -1, dtype=np.int64)
        # ticket of the last asynchronous copy into each slot (0: none); BlockMover.wait_writes reads it
        self.pending_write = np.zeros(num_slots, dtype=np.int64)
        # LIFO stack of free slots; the top is at the end. Initially slot 0 is on top.
        self._free = np.arange(num_slots - 1, -1, -1, dtype=np.int64)
        self._num_free = num_slots

    # ------------------------------------------------------------------ accounting
    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        return self.num_slots - self._num_free

    @property
    def bytes_total(self) -> int:
        return self.num_slots * self.spec.bytes_per_block

    @property
    def bytes_used(self) -> int:
        return self.num_used * self.spec.bytes_per_block

    @property
    def is_pinned(self) -> bool:
        return self.kv.device.type == "cpu" and self.num_slots > 0 and self.kv.is_pinned()

    # ------------------------------------------------------------------ allocation
    def allocate(self, block_ids: np.ndarray) -> np.ndarray:
        """Take ``len(block_ids)`` free slots for those blocks (refcount 1 each); returns the slots.

        Raises CapacityError (nothing changed) when fewer slots are free.
        """
        block_ids = np.asarray(block_ids, dtype=np.int64).reshape(-1)
        n = block_ids.shape[0]
        if n > self._num_free:
            raise CapacityError(
                f"{self.name} tier: need {n} free blocks, have {self._num_free} of {self.num_slots} "
                f"({self.spec.bytes_per_block} bytes each)"
            )
        top = self._num_free
        slots = self._free[top - n : top][::-1].copy()
        self._num_free = top - n
        self.refcount[slots] = 1
        self.owner[slots] = block_ids
        return slots

    def release(self, slots: np.ndarray) -> None:
        """Drop one reference to each slot; slots reaching 0 return to the free list.

        Raises OutOfRangeError / BlockStateError (nothing changed) for out-of-range or already
        free slots, or a slot listed twice.
        """
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        if slots.size == 0:
            return
        self._check_slots(slots)
        if np.unique(slots).size != slots.size:
            raise BlockStateError(f"{self.name} tier: release() got a slot more than once: {slots.tolist()}")
        self.refcount[slots] -= 1
        freed = slots[self.refcount[slots] == 0]
        self.owner[freed] = -1
        top = self._num_free
        self._free[top : top + freed.size] = freed[::-1]
        self._num_free = top + freed.size

    def _check_slots(self, slots: np.ndarray) -> None:
        bad = slots[(slots < 0) | (slots >= self.num_slots)]
        if bad.size:
            raise OutOfRangeError(f"{self.name} tier: slot ids {bad.tolist()} out of range [0, {self.num_slots})")
        dead = slots[self.refcount[slots] <= 0]
        if dead.size:
            raise BlockStateError(f"{self.name} tier: slots {dead.tolist()} are not allocated (double free?)")

    # ------------------------------------------------------------------ views
    def layer_view(self, layer: int, kv_index: int) -> torch.Tensor:
        """K (``kv_index=0``) or V (``1``) cache of one layer: ``[num_slots, block_size, Hkv, D]``, a view."""
        return self.kv[:, layer, kv_index]

    def gather_tokens(self, layer: int, kv_index: int, slots: np.ndarray, offsets: np.ndarray, heads: np.ndarray) -> torch.Tensor:
        """K (``kv_index=0``) or V (``1``) of single tokens and heads: ``[n, D]`` rows of
        ``layer_view(layer, kv_index)[slots, offsets, heads]`` (int64 arrays of length n), read
        by one ``index_select`` over the pool as rows of D values."""
        spec = self.spec
        rows = (((slots * spec.num_layers + layer) * 2 + kv_index) * spec.block_size + offsets) * spec.num_kv_heads + heads
        index = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)).to(self.kv.device)
        return self.kv.view(-1, spec.head_dim).index_select(0, index)

    def check(self) -> None:
        """Raise AssertionError (also under ``python -O``) if an invariant of the pool is broken."""
        free = self._free[: self._num_free]
        used = np.setdiff1d(np.arange(self.num_slots), free)
        for ok, broken in (
            (np.unique(free).size == free.size, "slot on the free list twice"),
            (np.all(self.refcount[free] == 0), "free slot with references"),
            (np.all(self.owner[free] == -1), "free slot with an owner"),
            (np.all(self.refcount[used] >= 1), "allocated slot with refcount 0"),
            (used.size == self.num_used, "free list and used count disagree"),
        ):
            if not ok:
                raise AssertionError(f"{self.name} tier: {broken}")
