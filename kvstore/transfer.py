"""Tier-to-tier block copies.

``BlockMover.copy(src, src_slots, dst, dst_slots)`` copies whole blocks between two pools.
On CUDA it runs on a dedicated stream, reads/writes pinned host memory with non-blocking
copies, and returns a :class:`TransferHandle` whose event the caller waits on before using
the destination (``handle.wait()`` makes the current stream wait; ``handle.synchronize()``
blocks the host). Without CUDA the same calls run synchronously and the handle is already
complete, so callers are written once.

Scattered host slots are first packed into a pinned staging buffer (one ``index_select``)
and sent in one copy, then scattered on the device with one ``index_copy_``; runs of
consecutive slots need no staging.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvstore.blocks import BlockPool

__all__ = ["BlockMover", "TransferHandle"]


@dataclass
class TransferHandle:
    """Completion of one copy. ``event`` is None when the copy was synchronous."""

    event: torch.cuda.Event | None = None
    device: torch.device | None = None
    num_blocks: int = 0
    num_bytes: int = 0

    def wait(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make ``stream`` (default: the current stream) wait for the copy, without blocking the host."""
        if self.event is not None:
            (stream or torch.cuda.current_stream(self.device)).wait_event(self.event)

    def synchronize(self) -> None:
        """Block the host until the copy is done."""
        if self.event is not None:
            self.event.synchronize()

    def done(self) -> bool:
        return self.event is None or self.event.query()


def _is_run(slots: np.ndarray) -> bool:
    return slots.size > 0 and bool(np.all(np.diff(slots) == 1))


class BlockMover:
    """Copies blocks between pools; owns the CUDA copy stream and the pinned staging buffer."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._staging: torch.Tensor | None = None
        self._staging_busy: torch.cuda.Event | None = None  # last async copy reading/writing staging

    def synchronize(self) -> None:
        """Block the host until every copy issued so far has finished (before CPU reads of host memory)."""
        if self.stream is not None:
            self.stream.synchronize()

    def _staging_for(self, like: torch.Tensor, n: int) -> torch.Tensor:
        """A pinned ``[n, *block_shape]`` buffer, once the previous copy through it has finished."""
        if self._staging_busy is not None:
            self._staging_busy.synchronize()
            self._staging_busy = None
        shape = (n, *like.shape[1:])
        buf = self._staging
        if buf is None or buf.shape[0] < n or buf.shape[1:] != like.shape[1:] or buf.dtype != like.dtype:
            buf = torch.empty((max(n, 64), *like.shape[1:]), dtype=like.dtype, pin_memory=True)
            self._staging = buf
        return buf[: shape[0]]

    def copy(self, src: BlockPool, src_slots: np.ndarray, dst: BlockPool, dst_slots: np.ndarray) -> TransferHandle:
        """Copy ``src.kv[src_slots]`` into ``dst.kv[dst_slots]`` (same length, whole blocks)."""
        src_slots = np.asarray(src_slots, dtype=np.int64)
        dst_slots = np.asarray(dst_slots, dtype=np.int64)
        assert src_slots.shape == dst_slots.shape
        n = int(src_slots.size)
        nbytes = n * src.spec.bytes_per_block
        if n == 0:
            return TransferHandle()
        if self.stream is None or (src.kv.device.type == "cpu" and dst.kv.device.type == "cpu"):
            self._copy_sync(src.kv, src_slots, dst.kv, dst_slots)
            return TransferHandle(num_blocks=n, num_bytes=nbytes)
        # The copy stream must see every write the compute stream issued to the source.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self._copy_async(src, src_slots, dst, dst_slots)
            event = torch.cuda.Event()
            event.record(self.stream)
        if self._staging is not None:
            self._staging_busy = event
        return TransferHandle(event=event, device=self.device, num_blocks=n, num_bytes=nbytes)

    @staticmethod
    def _copy_sync(src: torch.Tensor, src_slots: np.ndarray, dst: torch.Tensor, dst_slots: np.ndarray) -> None:
        if _is_run(src_slots) and _is_run(dst_slots):
            dst[int(dst_slots[0]) : int(dst_slots[-1]) + 1].copy_(src[int(src_slots[0]) : int(src_slots[-1]) + 1])
            return
        s = torch.from_numpy(src_slots).to(src.device)
        d = torch.from_numpy(dst_slots).to(dst.device)
        dst.index_copy_(0, d, src.index_select(0, s).to(dst.device))

    def _copy_async(self, src: BlockPool, src_slots: np.ndarray, dst: BlockPool, dst_slots: np.ndarray) -> None:
        s_kv, d_kv = src.kv, dst.kv
        if _is_run(src_slots) and _is_run(dst_slots):
            d_kv[int(dst_slots[0]) : int(dst_slots[-1]) + 1].copy_(
                s_kv[int(src_slots[0]) : int(src_slots[-1]) + 1], non_blocking=True
            )
            return
        n = src_slots.size
        if s_kv.device.type == "cpu":  # host -> device: pack into pinned staging, one H2D copy, scatter
            staging = self._staging_for(s_kv, n)
            torch.index_select(s_kv, 0, torch.from_numpy(src_slots), out=staging)
            moved = staging.to(self.device, non_blocking=True)
            d_kv.index_copy_(0, torch.from_numpy(dst_slots).to(self.device, non_blocking=True), moved)
            moved.record_stream(self.stream)
        else:  # device -> host: gather on device, one D2H copy (straight into a run of host slots if it is one)
            packed = s_kv.index_select(0, torch.from_numpy(src_slots).to(self.device, non_blocking=True))
            if _is_run(dst_slots):
                d_kv[int(dst_slots[0]) : int(dst_slots[-1]) + 1].copy_(packed, non_blocking=True)
                packed.record_stream(self.stream)
                return
            staging = self._staging_for(d_kv, n)
            staging.copy_(packed, non_blocking=True)
            # The host-side scatter must wait for the D2H copy to land.
            torch.cuda.current_stream(self.device).synchronize()
            d_kv.index_copy_(0, torch.from_numpy(dst_slots), staging)
