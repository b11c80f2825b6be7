"""BlockSegments: attention segments given as runs of slots in a paged KV pool.

A segment is a run of blocks holding consecutive tokens of one sequence; every block of a run
is full except possibly its last. The segments are concatenated into one *compact* token order
(segment after segment, holes skipped): block ``b`` of the flat list lives in pool slot
``slots[b]`` and holds compact tokens ``[block_start[b], block_start[b + 1])``. The causal mask
(when asked for) applies to the last segment, which ends the compact order.

Built once per attention call on the host (numpy, vectorised), then moved to the device in one
copy; the host-side scalars (``num_tokens``, ``last_start``, ``max_slot``) let every later check
run without a device sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvstore.errors import ConfigError, OutOfRangeError, ShapeError
from kvstore.syncs import upload

__all__ = ["BlockSegments"]


@dataclass(frozen=True, kw_only=True, eq=False)
class BlockSegments:
    """Segments as runs of pool slots (see the module docstring).

    Attributes:
        slots: int32 ``[num_blocks]``, the pool slot of every block, segment after segment.
        block_start: int32 ``[num_blocks + 1]``, compact index of each block's first token;
            ``block_start[-1] == num_tokens``.
        block_size: tokens per full block (the pool's block size).
        num_tokens: total tokens over all segments.
        last_start: compact index of the last segment's first token.
        max_slot: the largest slot id in ``slots`` (range checks without a device sync).

    Build with :meth:`build` or :meth:`from_runs`, which validate the contents; the
    constructor checks only shapes, dtypes and devices.
    """

    slots: torch.Tensor
    block_start: torch.Tensor
    block_size: int
    num_tokens: int
    last_start: int
    max_slot: int

    def __post_init__(self) -> None:
        if self.slots.dtype != torch.int32 or self.slots.dim() != 1:
            raise ShapeError(
                f"BlockSegments.slots must be int32 [num_blocks], got {self.slots.dtype} {tuple(self.slots.shape)}"
            )
        if self.block_start.dtype != torch.int32 or self.block_start.shape != (self.slots.shape[0] + 1,):
            raise ShapeError(
                f"BlockSegments.block_start must be int32 [{self.slots.shape[0] + 1}], "
                f"got {self.block_start.dtype} {tuple(self.block_start.shape)}"
            )
        if self.slots.device != self.block_start.device:
            raise ShapeError(f"BlockSegments: slots on {self.slots.device}, block_start on {self.block_start.device}")
        if not self.slots.is_contiguous() or not self.block_start.is_contiguous():
            raise ShapeError("BlockSegments: slots and block_start must be contiguous")
        if not 0 <= self.last_start < self.num_tokens:
            raise ConfigError(f"BlockSegments.last_start={self.last_start} outside [0, num_tokens={self.num_tokens})")

    @property
    def num_blocks(self) -> int:
        return self.slots.shape[0]

    @property
    def device(self) -> torch.device:
        return self.slots.device

    @property
    def last_tokens(self) -> int:
        """Tokens in the last segment."""
        return self.num_tokens - self.last_start

    @classmethod
    def build(
        cls,
        slots: Sequence[int] | np.ndarray,
        segment_offsets: Sequence[int] | np.ndarray,
        last_block_tokens: Sequence[int] | np.ndarray,
        *,
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> "BlockSegments":
        """Segments from flat arrays.

        Args:
            slots: ``[num_blocks]`` pool slots, segment after segment.
            segment_offsets: ``[S + 1]``, segment ``s`` is ``slots[offsets[s]:offsets[s + 1]]``;
                starts at 0, ends at ``num_blocks``, strictly increasing (no empty segment).
            last_block_tokens: ``[S]``, tokens in each segment's last block, in ``[1, block_size]``.
            block_size: tokens per full block.
            device: where the index tensors live (the pool's device).

        Raises:
            ConfigError: inconsistent offsets, token counts or block size.
            OutOfRangeError: a negative slot id.
        """
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
            raise ConfigError(f"BlockSegments: block_size must be a positive int, got {block_size!r}")
        slots_np = np.asarray(slots, dtype=np.int64).reshape(-1)
        offsets = np.asarray(segment_offsets, dtype=np.int64).reshape(-1)
        last = np.asarray(last_block_tokens, dtype=np.int64).reshape(-1)
        num_segments = offsets.size - 1
        if num_segments < 1:
            raise ConfigError(f"BlockSegments: segment_offsets needs at least 2 entries, got {offsets.tolist()}")
        if offsets[0] != 0 or offsets[-1] != slots_np.size or np.any(np.diff(offsets) <= 0):
            raise ConfigError(
                f"BlockSegments: segment_offsets must rise strictly from 0 to num_blocks={slots_np.size}, "
                f"got {offsets.tolist()}"
            )
        if last.size != num_segments:
            raise ConfigError(f"BlockSegments: {last.size} last_block_tokens for {num_segments} segments")
        bad = last[(last < 1) | (last > block_size)]
        if bad.size:
            raise ConfigError(f"BlockSegments: last_block_tokens {bad.tolist()} outside [1, block_size={block_size}]")
        negative = slots_np[slots_np < 0]
        if negative.size:
            raise OutOfRangeError(f"BlockSegments: negative slot ids {negative.tolist()}")
        if slots_np.max() >= 2**31:
            raise OutOfRangeError(f"BlockSegments: slot id {int(slots_np.max())} does not fit int32")

        tokens = np.full(slots_np.size, block_size, dtype=np.int64)
        tokens[offsets[1:] - 1] = last
        block_start = np.zeros(slots_np.size + 1, dtype=np.int64)
        np.cumsum(tokens, out=block_start[1:])
        num_tokens = int(block_start[-1])
        if num_tokens >= 2**31:
            raise ConfigError(f"BlockSegments: {num_tokens} tokens do not fit int32 indices")
        packed = upload(np.concatenate([slots_np, block_start]).astype(np.int32), device)  # no host wait
        return cls(
            slots=packed[: slots_np.size],
            block_start=packed[slots_np.size :],
            block_size=block_size,
            num_tokens=num_tokens,
            last_start=int(block_start[offsets[-2]]),
            max_slot=int(slots_np.max()),
        )

    @classmethod
    def from_runs(
        cls,
        runs: Sequence[Sequence[int] | np.ndarray],
        last_block_tokens: Sequence[int] | np.ndarray,
        *,
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> "BlockSegments":
        """Segments from one slot array per segment (see :meth:`build`)."""
        arrays = [np.asarray(r, dtype=np.int64).reshape(-1) for r in runs]
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([a.size for a in arrays], out=offsets[1:])
        flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        return cls.build(flat, offsets, last_block_tokens, block_size=block_size, device=device)

    def token_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool address of every compact token: ``(slot, offset)``, int64 ``[num_tokens]`` each."""
        counts = self.block_start.diff()
        block = torch.repeat_interleave(
            torch.arange(self.num_blocks, device=self.device), counts, output_size=self.num_tokens
        )
        offset = torch.arange(self.num_tokens, device=self.device) - self.block_start[block]
        return self.slots[block].long(), offset
