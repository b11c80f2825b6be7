"""Tier-to-tier block copies.

``BlockMover.copy(src, src_slots, dst, dst_slots)`` copies whole blocks between two pools.
On CUDA it runs on a dedicated stream, reads/writes pinned host memory with non-blocking
copies, and returns a :class:`TransferHandle` whose event the caller waits on before using
the destination (``handle.wait()`` makes the current stream wait; ``handle.synchronize()``
blocks the host). Without CUDA the same calls run synchronously and the handle is already
complete, so callers are written once.

Host -> device copies of scattered slots take one of three paths (:data:`H2D_PATHS`); a run
of consecutive slots is always one copy:

* ``"staging"`` (the default): pack into a pinned staging buffer (one ``index_select`` on the
  CPU), one H2D copy, one ``index_copy_`` scatter on the device;
* ``"memcpy"``: one ``cudaMemcpyAsync`` per run of consecutive (source, destination) slots,
  straight from the pinned pool (the copy engines; no CPU pass over the bytes);
* ``"uva"``: one launch of csrc/block_gather.cu reading the pinned pool through unified
  virtual addressing (zero-copy) and writing the device slots (:func:`gather_blocks`);
* ``"auto"``: ``"memcpy"`` when runs are long (each copy amortises its launch), else ``"uva"``
  (:func:`choose_h2d_path`).

``BlockMover(device, h2d_path=None)`` reads ``$KVSTORE_H2D_PATH`` and falls back to
:data:`DEFAULT_H2D_PATH`, which stays ``"staging"`` until tests/test_transfer_cuda.py has
passed on a GPU and bench_decode has measured the crossover (:data:`UVA_MAX_RUN_BYTES`).
The memcpy and uva paths read the host pool asynchronously on the copy stream, as the copy
of a run always did: host writes to those slots must come after the copy (the store orders
them on the same stream or synchronizes first).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch

from kvstore.blocks import BlockPool
from kvstore.errors import ConfigError, OutOfRangeError, ShapeError

__all__ = [
    "BlockMover", "TransferHandle", "H2D_PATHS", "H2D_PATH_ENV", "DEFAULT_H2D_PATH", "UVA_MAX_RUN_BYTES",
    "slot_runs", "choose_h2d_path", "gather_blocks",
]

H2D_PATH_ENV = "KVSTORE_H2D_PATH"
DEFAULT_H2D_PATH = "staging"
#: Under ``"auto"``, runs of at most this many bytes on average go through the UVA gather kernel,
#: longer ones through cudaMemcpyAsync. A first guess (a copy's ~2-5 us fixed cost is ~10% of a
#: 256 KiB copy at PCIe 5 rates); bench_decode measures both paths per block count.
UVA_MAX_RUN_BYTES = 256 * 1024
_GATHER_THREADS, _GATHER_UNROLL = 256, 8  # bg::kThreads, bg::U in csrc/block_gather.cu


class CopyStream:
    """Where a mover's asynchronous copies run. A copy is a :class:`StreamOp`; :meth:`submit`
    starts it and returns its event (``None``: complete on return), which :class:`TransferHandle`
    wraps. Three implementations share the mover's code: :class:`ImmediateStream` (no CUDA: every
    copy completes at once), :class:`CudaCopyStream` (a dedicated CUDA stream, an event per copy)
    and the tests' late stream (tests/late_stream.py: a copy lands only when its event is waited
    on, and its destination holds poison until then), which makes ordering bugs visible on a CPU.

    ``asynchronous`` says whether copies may still be in flight after :meth:`submit`: the mover
    then plans them as it does on a GPU (paths, staging), whatever the pools' devices.
    """

    asynchronous = False

    def submit(self, op: "StreamOp"):
        """Start ``op`` after every copy submitted before it; returns its event or None."""
        op.write(op.read())
        return None

    def synchronize(self) -> None:
        """Block the host until every submitted copy has landed."""

    def wait_host_work(self) -> None:
        """Order later copies after the work the host has issued so far (CUDA: the current stream)."""


class ImmediateStream(CopyStream):
    """No CUDA: every copy runs when submitted (the default on CPU)."""


class StreamOp(NamedTuple):
    """One asynchronous copy.

    ``read()`` returns what the copy reads (at the moment it runs, in stream order) and
    ``write(payload)`` stores it: together the reference any stream can run. ``run`` (CUDA only,
    optional) does both with the fast path the mover chose; ``poison()`` overwrites the
    destination with garbage (the late stream calls it at submit time); ``host_dst`` says the
    destination is host memory (visible to the CPU only after a host synchronisation).
    """

    read: Callable[[], object]
    write: Callable[[object], None]
    poison: Callable[[], None]
    host_dst: bool
    run: Callable[[], None] | None = None


class CudaCopyStream(CopyStream):
    """A dedicated CUDA stream: ``op.run`` (else the reference) runs on it and records an event."""

    asynchronous = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def submit(self, op: StreamOp):
        with torch.cuda.stream(self.stream):
            if op.run is not None:
                op.run()
            else:
                op.write(op.read())
            event = torch.cuda.Event()
            event.record(self.stream)
        return _CudaEvent(event, self.device)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def wait_host_work(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))


class _CudaEvent:
    """A CUDA event in the interface every stream's events share."""

    __slots__ = ("event", "device")

    def __init__(self, event: torch.cuda.Event, device: torch.device) -> None:
        self.event = event
        self.device = device

    def wait(self, *, reads_host: bool = False) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.event)

    def synchronize(self) -> None:
        self.event.synchronize()

    def query(self) -> bool:
        return self.event.query()


@dataclass
class TransferHandle:
    """Completion of one copy. ``event`` is None when the copy was synchronous."""

    event: object | None = None
    num_blocks: int = 0
    num_bytes: int = 0
    path: str | None = None  # the H2D path of a scattered host -> device copy, None otherwise

    def wait(self, *, reads_host: bool = False) -> None:
        """Make the current stream wait for the copy, without blocking the host: later kernels
        (and later copies) see its result. ``reads_host``: the waiting kernels read the copy's
        host-memory destination in place (UVA); a CPU reader must :meth:`synchronize` instead."""
        if self.event is not None:
            self.event.wait(reads_host=reads_host)

    def synchronize(self) -> None:
        """Block the host until the copy has landed (before the CPU reads its destination)."""
        if self.event is not None:
            self.event.synchronize()

    def done(self) -> bool:
        return self.event is None or self.event.query()


def _is_run(slots: np.ndarray) -> bool:
    return slots.size > 0 and bool(np.all(np.diff(slots) == 1))


def slot_runs(src_slots: np.ndarray, dst_slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximal runs over which both slot lists advance by one.

    Args:
        src_slots, dst_slots: ``[n]`` int slot lists of one copy.

    Returns:
        ``(starts, lengths)``, each ``[num_runs]`` int64: run ``i`` copies
        ``src_slots[starts[i] : starts[i] + lengths[i]]`` (consecutive) to the consecutive
        ``dst_slots`` at the same indices.
    """
    src_slots = np.asarray(src_slots, dtype=np.int64).reshape(-1)
    dst_slots = np.asarray(dst_slots, dtype=np.int64).reshape(-1)
    if src_slots.shape != dst_slots.shape:
        raise ShapeError(f"slot_runs: {src_slots.size} source slots but {dst_slots.size} destination slots")
    n = src_slots.size
    if n == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    breaks = np.flatnonzero((np.diff(src_slots) != 1) | (np.diff(dst_slots) != 1)) + 1
    starts = np.concatenate([np.zeros(1, dtype=np.int64), breaks])
    return starts, np.diff(np.append(starts, n))


def choose_h2d_path(num_runs: int, num_blocks: int, bytes_per_block: int, *, uva_max_run_bytes: int = UVA_MAX_RUN_BYTES) -> str:
    """``"memcpy"`` or ``"uva"`` for a host -> device copy of ``num_blocks`` blocks in ``num_runs``
    runs: one run, or runs averaging more than ``uva_max_run_bytes``, go to the copy engines;
    many short runs to the gather kernel, which moves them all in one launch."""
    for name, value in (("num_runs", num_runs), ("num_blocks", num_blocks), ("bytes_per_block", bytes_per_block)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"choose_h2d_path: {name} must be an int >= 1, got {value!r}")
    if num_runs > num_blocks:
        raise ConfigError(f"choose_h2d_path: {num_runs} runs cannot hold only {num_blocks} blocks")
    if num_runs == 1 or num_blocks * bytes_per_block > uva_max_run_bytes * num_runs:
        return "memcpy"
    return "uva"


def _slot_layout(name: str, pool: torch.Tensor) -> int:
    """Bytes of one slot; every slot must be contiguous and 16-byte aligned for the gather kernel."""
    inner = pool.shape[1:]
    expect, acc = [], 1
    for size in reversed(inner):
        expect.append(acc)
        acc *= size
    slot_bytes = acc * pool.element_size()
    if tuple(pool.stride()[1:]) != tuple(reversed(expect)):
        raise ShapeError(f"gather_blocks: {name} slots must be contiguous, got strides {pool.stride()}")
    if pool.data_ptr() % 16 or slot_bytes % 16 or pool.stride(0) * pool.element_size() % 16:
        raise ShapeError(
            f"gather_blocks: {name} slots must be 16-byte aligned: data_ptr % 16 = {pool.data_ptr() % 16}, "
            f"slot {slot_bytes} bytes, slot stride {pool.stride(0) * pool.element_size()} bytes"
        )
    return slot_bytes


def gather_blocks(src: torch.Tensor, src_slots: np.ndarray, dst: torch.Tensor, dst_slots: np.ndarray) -> None:
    """``dst[dst_slots] = src[src_slots]`` in one launch of csrc/block_gather.cu on the current stream.

    Args:
        src: ``[num_src_slots, *block]`` pool, on ``dst``'s device or pinned host memory (read
            in place through unified virtual addressing).
        src_slots, dst_slots: ``[n]`` int slot lists, in range, ``dst_slots`` distinct.
        dst: ``[num_dst_slots, *block]`` CUDA pool of the same dtype and block shape.

    Every slot must be contiguous and 16-byte aligned (a BlockPool's are). Asynchronous: the
    host pool must not change until the current stream has passed the copy.
    """
    src_slots = np.asarray(src_slots, dtype=np.int64).reshape(-1)
    dst_slots = np.asarray(dst_slots, dtype=np.int64).reshape(-1)
    if src_slots.shape != dst_slots.shape:
        raise ShapeError(f"gather_blocks: {src_slots.size} source slots but {dst_slots.size} destination slots")
    if src.dtype != dst.dtype or src.shape[1:] != dst.shape[1:]:
        raise ShapeError(
            f"gather_blocks: src {tuple(src.shape)} {src.dtype} and dst {tuple(dst.shape)} {dst.dtype} "
            "hold different blocks (no silent casts)"
        )
    for name, slots, pool in (("src", src_slots, src), ("dst", dst_slots, dst)):
        bad = slots[(slots < 0) | (slots >= pool.shape[0])]
        if bad.size:
            raise OutOfRangeError(f"gather_blocks: {name} slots {bad[:8].tolist()} out of range [0, {pool.shape[0]})")
    if np.unique(dst_slots).size != dst_slots.size:
        raise ShapeError("gather_blocks: a destination slot is listed twice")
    if dst.device.type != "cuda":
        raise ShapeError(f"gather_blocks: dst must be a CUDA pool, got {dst.device}")
    if src.device.type == "cpu" and not src.is_pinned():
        raise ShapeError("gather_blocks: a host src pool must be pinned (page-locked) to be read through UVA")
    if src.device.type == "cuda" and src.device != dst.device:
        raise ShapeError(f"gather_blocks: src on {src.device}, dst on {dst.device}")
    slot_bytes = _slot_layout("src", src)
    _slot_layout("dst", dst)
    n = src_slots.size
    if n == 0:
        return
    from kvstore import kernels  # the cupy loader, imported on the CUDA path only

    slots = torch.from_numpy(np.stack([src_slots, dst_slots])).pin_memory().to(dst.device, non_blocking=True)
    vecs = slot_bytes // 16
    per_cta = _GATHER_THREADS * _GATHER_UNROLL
    grid = (-(-vecs // per_cta), min(n, 65535), 1)
    kernel = kernels.load_kernel("block_gather.cu", "gather_blocks", device=dst.device)
    kernels.launch(
        kernel, grid, (_GATHER_THREADS, 1, 1),
        (
            kernels.ptr(src), kernels.ptr(dst), kernels.ptr(slots), kernels.i32(n), kernels.i64(vecs),
            kernels.i64(src.stride(0) * src.element_size() // 16), kernels.i64(dst.stride(0) * dst.element_size() // 16),
        ),
        device=dst.device,
    )


def _poison(kv: torch.Tensor, slots: np.ndarray) -> Callable[[], None]:
    def poison() -> None:
        index = torch.from_numpy(slots).to(kv.device)
        kv.index_fill_(0, index, float("nan") if kv.is_floating_point() else -1)

    return poison


class BlockMover:
    """Copies blocks between pools; owns the copy stream and the pinned staging buffer.

    Args:
        device: the device tier's device.
        h2d_path: how scattered host -> device copies run, a key of :data:`H2D_PATHS` or
            ``"auto"`` (None: ``$KVSTORE_H2D_PATH``, else :data:`DEFAULT_H2D_PATH`). Unused without CUDA.
        stream: where copies run (default: a :class:`CudaCopyStream` on CUDA, else an
            :class:`ImmediateStream`).
    """

    def __init__(self, device: torch.device, *, h2d_path: str | None = None, stream: CopyStream | None = None) -> None:
        name = os.environ.get(H2D_PATH_ENV, DEFAULT_H2D_PATH) if h2d_path is None else h2d_path
        if name not in H2D_PATHS and name != "auto":
            source = f"${H2D_PATH_ENV}" if h2d_path is None else "h2d_path"
            raise ConfigError(f"BlockMover: {source}={name!r} is not one of {sorted([*H2D_PATHS, 'auto'])}")
        self.h2d_path = name
        self.device = torch.device(device)
        if stream is None:
            stream = CudaCopyStream(self.device) if self.device.type == "cuda" else ImmediateStream()
        self.stream = stream
        self._staging: torch.Tensor | None = None
        self._staging_busy: TransferHandle | None = None  # last async copy reading/writing staging

    def synchronize(self) -> None:
        """Block the host until every copy issued so far has finished (before CPU reads of host memory)."""
        self.stream.synchronize()

    def _staging_for(self, like: torch.Tensor, n: int) -> torch.Tensor:
        """A pinned ``[n, *block_shape]`` buffer, once the previous copy through it has finished."""
        if self._staging_busy is not None:
            self._staging_busy.synchronize()
            self._staging_busy = None
        shape = (n, *like.shape[1:])
        buf = self._staging
        if buf is None or buf.shape[0] < n or buf.shape[1:] != like.shape[1:] or buf.dtype != like.dtype:
            buf = torch.empty((max(n, 64), *like.shape[1:]), dtype=like.dtype, pin_memory=torch.cuda.is_available())
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
        if not self.stream.asynchronous:
            self._copy_sync(src.kv, src_slots, dst.kv, dst_slots)
            return TransferHandle(num_blocks=n, num_bytes=nbytes)
        # The copy stream must see every write the compute stream issued to the source.
        self.stream.wait_host_work()
        path, event = self._copy_async(src, src_slots, dst, dst_slots)
        handle = TransferHandle(event=event, num_blocks=n, num_bytes=nbytes, path=path)
        if self._staging is not None:
            self._staging_busy = handle
        return handle

    @staticmethod
    def _copy_sync(src: torch.Tensor, src_slots: np.ndarray, dst: torch.Tensor, dst_slots: np.ndarray) -> None:
        if _is_run(src_slots) and _is_run(dst_slots):
            dst[int(dst_slots[0]) : int(dst_slots[-1]) + 1].copy_(src[int(src_slots[0]) : int(src_slots[-1]) + 1])
            return
        s = torch.from_numpy(src_slots).to(src.device)
        d = torch.from_numpy(dst_slots).to(dst.device)
        dst.index_copy_(0, d, src.index_select(0, s).to(dst.device))

    def _slot_op(self, s_kv: torch.Tensor, src_slots: np.ndarray, d_kv: torch.Tensor, dst_slots: np.ndarray, run=None, *, host_dst: bool) -> StreamOp:
        """``d_kv[dst_slots] = s_kv[src_slots]`` as a stream op (``run``: its CUDA path)."""
        s_idx = torch.from_numpy(src_slots)
        d_idx = torch.from_numpy(dst_slots)
        return StreamOp(
            read=lambda: s_kv.index_select(0, s_idx.to(s_kv.device)),
            write=lambda rows: d_kv.index_copy_(0, d_idx.to(d_kv.device), rows.to(d_kv.device)),
            poison=_poison(d_kv, dst_slots),
            host_dst=host_dst,
            run=run,
        )

    def _copy_async(self, src: BlockPool, src_slots: np.ndarray, dst: BlockPool, dst_slots: np.ndarray):
        """Issue the copy on the copy stream; returns the H2D path of a scattered host -> device copy and the event."""
        s_kv, d_kv = src.kv, dst.kv
        if _is_run(src_slots) and _is_run(dst_slots):
            s0, d0, length = int(src_slots[0]), int(dst_slots[0]), src_slots.size
            run = lambda: d_kv[d0 : d0 + length].copy_(s_kv[s0 : s0 + length], non_blocking=True)  # noqa: E731
            return None, self.stream.submit(self._slot_op(s_kv, src_slots, d_kv, dst_slots, run, host_dst=dst.host))
        if src.host and not dst.host:  # host -> device
            path = self.h2d_path
            if path == "auto":
                starts, _ = slot_runs(src_slots, dst_slots)
                path = choose_h2d_path(int(starts.size), int(src_slots.size), src.spec.bytes_per_block)
                if path == "uva" and not s_kv.is_pinned():
                    path = "memcpy"  # UVA needs page-locked memory; the copy engines take any
            return path, H2D_PATHS[path](self, s_kv, src_slots, d_kv, dst_slots)
        # device -> host: gather on device, one D2H copy (straight into a run of host slots if it is one)
        if _is_run(dst_slots):
            d0 = int(dst_slots[0])
            s_idx = torch.from_numpy(src_slots)

            def run() -> None:
                packed = s_kv.index_select(0, s_idx.to(self.device, non_blocking=True))
                d_kv[d0 : d0 + src_slots.size].copy_(packed, non_blocking=True)

            return None, self.stream.submit(self._slot_op(s_kv, src_slots, d_kv, dst_slots, run, host_dst=dst.host))
        staging = self._staging_for(d_kv, src_slots.size)
        s_idx = torch.from_numpy(src_slots)
        self.stream.submit(StreamOp(
            read=lambda: s_kv.index_select(0, s_idx.to(s_kv.device)),
            write=lambda rows: staging.copy_(rows, non_blocking=True),
            poison=lambda: staging.fill_(float("nan")),
            host_dst=True,
        ))
        # The host-side scatter must wait for the D2H copy to land.
        self.stream.synchronize()
        d_kv.index_copy_(0, torch.from_numpy(dst_slots), staging)
        return None, None

    def _h2d_staging(self, s_kv: torch.Tensor, src_slots: np.ndarray, d_kv: torch.Tensor, dst_slots: np.ndarray):
        """Pack into pinned staging, one H2D copy, scatter on the device."""
        staging = self._staging_for(s_kv, src_slots.size)
        torch.index_select(s_kv, 0, torch.from_numpy(src_slots), out=staging)
        d_idx = torch.from_numpy(dst_slots)
        return self.stream.submit(StreamOp(
            read=lambda: staging.clone(),
            write=lambda rows: d_kv.index_copy_(0, d_idx.to(d_kv.device), rows.to(d_kv.device)),
            poison=_poison(d_kv, dst_slots),
            host_dst=False,
            run=lambda: d_kv.index_copy_(0, d_idx.to(self.device, non_blocking=True), staging.to(self.device, non_blocking=True)),
        ))

    def _h2d_memcpy(self, s_kv: torch.Tensor, src_slots: np.ndarray, d_kv: torch.Tensor, dst_slots: np.ndarray):
        """One cudaMemcpyAsync per run of consecutive slots, straight from the host pool."""
        starts, lengths = slot_runs(src_slots, dst_slots)

        def run() -> None:
            for a, length in zip(starts.tolist(), lengths.tolist()):
                s0, d0 = int(src_slots[a]), int(dst_slots[a])
                d_kv[d0 : d0 + length].copy_(s_kv[s0 : s0 + length], non_blocking=True)

        return self.stream.submit(self._slot_op(s_kv, src_slots, d_kv, dst_slots, run, host_dst=False))

    def _h2d_uva(self, s_kv: torch.Tensor, src_slots: np.ndarray, d_kv: torch.Tensor, dst_slots: np.ndarray):
        """One gather-kernel launch reading the pinned host pool in place."""
        return self.stream.submit(self._slot_op(s_kv, src_slots, d_kv, dst_slots, lambda: gather_blocks(s_kv, src_slots, d_kv, dst_slots), host_dst=False))


#: name -> ``BlockMover`` method copying scattered host slots to device slots on the current stream.
#: ``h2d_path="auto"`` picks "memcpy" or "uva" per copy (:func:`choose_h2d_path`).
H2D_PATHS = {
    "staging": BlockMover._h2d_staging,
    "memcpy": BlockMover._h2d_memcpy,
    "uva": BlockMover._h2d_uva,
}
