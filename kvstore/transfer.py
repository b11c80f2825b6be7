"""Tier-to-tier block copies, ordered by events.

``BlockMover.copy(src, src_slots, dst, dst_slots)`` copies whole blocks between two pools and
returns a :class:`TransferHandle`. Copies run on the mover's :class:`CopyStream`: on CUDA a
dedicated stream (:class:`CudaCopyStream`, an event per copy), on a CPU at once
(:class:`ImmediateStream`), in the tests on a stream whose copies land late
(tests/late_stream.py), so that the ordering rules below are checked without a GPU.

Ordering (DESIGN.md, "Copies are ordered by events"):

* a copy starts after everything the compute stream issued before it (the copy stream waits
  for it), and copies run in submit order;
* every copy into a pool records its ticket on the destination slots
  (``BlockPool.pending_write``); a reader waits for it: kernels through
  :meth:`TransferHandle.wait` (no host block), the CPU through :meth:`BlockMover.wait_writes`
  (a host wait, only when a listed slot still has a copy in flight);
* no path reads or writes pool bytes with the CPU: host memory is read and written only by
  the copy engines (``cudaMemcpyAsync``) or by a kernel through unified virtual addressing,
  on the copy stream, so a host slot is never read before the copy into it landed, and never
  overwritten by a late CPU pass.

Host -> device copies of scattered slots take one of two paths (:data:`H2D_PATHS`); a run of
consecutive slots is always one copy:

* ``"memcpy"`` (the default): one ``cudaMemcpyAsync`` per run of consecutive (source,
  destination) slots, straight from the pinned pool;
* ``"uva"``: one launch of csrc/block_gather.cu reading the pinned pool in place and writing
  the device slots (:func:`gather_blocks`);
* ``"auto"``: ``"memcpy"`` when runs are long (each copy amortises its launch), else ``"uva"``
  (:func:`choose_h2d_path`).

Device -> host copies gather the source slots on the device and copy each run of consecutive
host slots with one ``cudaMemcpyAsync``. ``BlockMover(device, h2d_path=None)`` reads
``$KVSTORE_H2D_PATH`` and falls back to :data:`DEFAULT_H2D_PATH`; the crossover
(:data:`UVA_MAX_RUN_BYTES`) is measured by bench_decode on a GPU.

The mover counts what it moves (:attr:`BlockMover.stats`, bytes per direction).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple

import numpy as np
import torch

from kvstore.blocks import BlockPool
from kvstore.errors import ConfigError, OutOfRangeError, ShapeError
from kvstore.rowcache import RowCache

__all__ = [
    "BlockMover", "CopyStream", "CudaCopyStream", "ImmediateStream", "StreamOp", "TransferHandle", "TransferStats", "H2D_PATHS", "H2D_PATH_ENV", "DEFAULT_H2D_PATH", "UVA_MAX_RUN_BYTES",
    "slot_runs", "choose_h2d_path", "gather_blocks", "gather_host_rows", "gather_rows_torch", "ROWS_BACKEND_ENV",
]

H2D_PATH_ENV = "KVSTORE_H2D_PATH"
DEFAULT_H2D_PATH = "memcpy"
#: Under ``"auto"``, runs of at most this many bytes on average go through the UVA gather kernel,
#: longer ones through cudaMemcpyAsync. A first guess (a copy's ~2-5 us fixed cost is ~10% of a
#: 256 KiB copy at PCIe 5 rates); bench_decode measures both paths per block count.
UVA_MAX_RUN_BYTES = 256 * 1024
_GATHER_THREADS, _GATHER_UNROLL = 256, 8  # bg::kThreads, bg::U in csrc/block_gather.cu
_ROWS_UNROLL = 4  # gr::U in csrc/gather_rows.cu (gr::kThreads is _GATHER_THREADS)
_ROWS_MAX_CTAS = 4096  # grid-stride beyond: ~30 CTAs per SM of an H100/H200, enough to fill it


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


@dataclass
class TransferStats:
    """Bytes a mover moved, per direction (host-side counts, no device sync)."""

    h2d_bytes: int = 0
    d2h_bytes: int = 0
    d2d_bytes: int = 0
    copies: int = 0

    def add(self, src: BlockPool, dst: BlockPool, nbytes: int) -> None:
        self.copies += 1
        if src.host and not dst.host:
            self.h2d_bytes += nbytes
        elif dst.host and not src.host:
            self.d2h_bytes += nbytes
        else:
            self.d2d_bytes += nbytes


class BlockMover:
    """Copies blocks between pools on one copy stream and tracks which slots have copies in flight.

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
        self.stats = TransferStats()
        self._handles: dict[int, TransferHandle] = {}  # ticket -> handle of a copy maybe in flight
        self._next_ticket = 1
        self._landed = 0  # every ticket <= this has landed (the host waited for it)
        self._row_bytes: torch.Tensor | None = None  # gather_rows' host bytes, counted on the device

    def synchronize(self) -> None:
        """Block the host until every copy issued so far has landed."""
        self.stream.synchronize()
        self._landed = self._next_ticket - 1
        self._handles.clear()

    def wait_writes(self, pool: BlockPool, slots: np.ndarray | None = None, *, host: bool = True) -> None:
        """Order a read of ``pool`` (``slots``; None: any slot) after the copies still landing there.

        ``host=True``: the CPU is about to read, so the host blocks until they landed (only when
        a listed slot has a copy in flight). ``host=False``: a kernel on the current stream reads
        (host memory in place, through UVA): the stream waits, the host does not.
        """
        pending = pool.pending_write if slots is None else pool.pending_write[np.asarray(slots, dtype=np.int64)]
        ticket = int(pending.max()) if pending.size else 0
        if ticket <= self._landed:
            return
        handle = self._handles[ticket]
        if not host:
            handle.wait(reads_host=True)
            return
        handle.synchronize()
        self._landed = ticket  # one stream: every earlier copy landed too
        for t in [t for t in self._handles if t <= ticket]:
            del self._handles[t]

    def gather_rows(
        self, device_pool: BlockPool, host_pool: BlockPool, layer: int, dev_slot: torch.Tensor, host_slot: torch.Tensor,
        positions: torch.Tensor, *, values: bool = True, cache: RowCache | None = None, num_tokens: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One layer's K (and V) rows of one sequence's tokens, wherever their blocks lie.

        Args:
            device_pool, host_pool: the two tiers.
            layer: the layer whose rows are read (only its bytes move).
            dev_slot, host_slot: ``[num_blocks]`` int64 on the device, the sequence's block table
                per tier (-1 where the block has no copy there).
            positions: ``[H, S]`` int64 on the device, the token each KV head reads (distinct
                per head); -1 reads nothing (a zero row).
            values: read V rows too.
            cache: the sequence's :class:`~kvstore.rowcache.RowCache` of this layer: host rows
                it holds do not move, the ones it misses move and stay.
            num_tokens: the sequence's tokens in this layer (with ``cache``).

        Returns:
            ``k, v: [H, S, D]`` on the device (``v`` None without ``values``): a row comes from the
            device copy of its block, else the host copy (through UVA, counted in
            :attr:`row_bytes`), else it is zero (the block has no copy: the caller restores it first).

        Runs on the current stream after the copies into both pools. Syncs: none on the CPU
        and with the UVA kernel; the torch path on CUDA reads the host rows' indices (one sync
        per K or V: see :func:`gather_rows_torch`).
        """
        self.wait_writes(host_pool, host=False)
        self.wait_writes(device_pool, host=False)
        k, v, host_rows = gather_rows_torch(
            device_pool, host_pool, layer, dev_slot, host_slot, positions, values=values, cache=cache, num_tokens=num_tokens,
        )
        if self._row_bytes is None:
            self._row_bytes = torch.zeros((), dtype=torch.int64, device=positions.device)
        self._row_bytes += host_rows * (device_pool.spec.head_dim * device_pool.kv.element_size())
        return k, v

    @property
    def row_bytes(self) -> torch.Tensor:
        """Bytes :meth:`gather_rows` read from host memory so far: an int64 device scalar (reading it syncs)."""
        if self._row_bytes is None:
            return torch.zeros((), dtype=torch.int64)
        return self._row_bytes

    def copy(self, src: BlockPool, src_slots: np.ndarray, dst: BlockPool, dst_slots: np.ndarray) -> TransferHandle:
        """Copy ``src.kv[src_slots]`` into ``dst.kv[dst_slots]`` (same length, whole blocks).

        The copy starts after the compute stream's work so far; later readers wait for the
        returned handle (kernels) or call :meth:`wait_writes` (the CPU).
        """
        src_slots = np.asarray(src_slots, dtype=np.int64).reshape(-1)
        dst_slots = np.asarray(dst_slots, dtype=np.int64).reshape(-1)
        if src_slots.shape != dst_slots.shape:
            raise ShapeError(f"BlockMover.copy: {src_slots.size} source slots but {dst_slots.size} destination slots")
        n = int(src_slots.size)
        nbytes = n * src.spec.bytes_per_block
        if n == 0:
            return TransferHandle()
        self.stats.add(src, dst, nbytes)
        if not self.stream.asynchronous:
            op = self._slot_op(src, src_slots, dst, dst_slots)
            op.write(op.read())
            return TransferHandle(num_blocks=n, num_bytes=nbytes)
        self.stream.wait_host_work()
        path, run = self._plan(src, src_slots, dst, dst_slots)
        event = self.stream.submit(self._slot_op(src, src_slots, dst, dst_slots, run))
        handle = TransferHandle(event=event, num_blocks=n, num_bytes=nbytes, path=path)
        if event is not None:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._handles[ticket] = handle
            dst.pending_write[dst_slots] = ticket
        return handle

    def _slot_op(self, src: BlockPool, src_slots: np.ndarray, dst: BlockPool, dst_slots: np.ndarray, run=None) -> StreamOp:
        """``dst.kv[dst_slots] = src.kv[src_slots]`` as a stream op (``run``: its CUDA path)."""
        s_kv, d_kv = src.kv, dst.kv
        s_idx, d_idx = torch.from_numpy(src_slots), torch.from_numpy(dst_slots)
        return StreamOp(
            read=lambda: s_kv.index_select(0, s_idx.to(s_kv.device)),
            write=lambda rows: d_kv.index_copy_(0, d_idx.to(d_kv.device), rows.to(d_kv.device)),
            poison=_poison(d_kv, dst_slots),
            host_dst=dst.host,
            run=run,
        )

    def _plan(self, src: BlockPool, src_slots: np.ndarray, dst: BlockPool, dst_slots: np.ndarray) -> tuple[str | None, Callable[[], None]]:
        """The CUDA path of a copy: ``(H2D path name or None, the function that issues it)``."""
        s_kv, d_kv = src.kv, dst.kv
        if _is_run(src_slots) and _is_run(dst_slots):
            return None, partial(_copy_runs, s_kv, d_kv, src_slots[:1], dst_slots[:1], np.array([src_slots.size]))
        if src.host and not dst.host:  # host -> device
            path = self.h2d_path
            if path == "auto":
                starts, _ = slot_runs(src_slots, dst_slots)
                path = choose_h2d_path(int(starts.size), int(src_slots.size), src.spec.bytes_per_block)
                if path == "uva" and not s_kv.is_pinned():
                    path = "memcpy"  # UVA needs page-locked memory; the copy engines take any
            return path, partial(H2D_PATHS[path], s_kv, src_slots, d_kv, dst_slots)
        # device -> host (or device -> device): gather on the device, one copy per run of destination slots
        return None, partial(_gather_then_copy_runs, s_kv, src_slots, d_kv, dst_slots)


def gather_rows_torch(
    device_pool: BlockPool, host_pool: BlockPool, layer: int, dev_slot: torch.Tensor, host_slot: torch.Tensor,
    positions: torch.Tensor, *, values: bool = True, cache: RowCache | None = None, num_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """:meth:`BlockMover.gather_rows` in torch ops (the reference), plus the count of rows read
    from the host pool (an int64 device scalar, K and V rows counted apiece).

    On the CPU both pools are read in place. On CUDA host rows are read by
    :func:`gather_host_rows` (the UVA kernel, or a torch fallback that syncs once).
    """
    spec = device_pool.spec
    bs, L, H, D = spec.block_size, spec.num_layers, positions.shape[0], spec.head_dim
    S = positions.shape[1]
    device = positions.device
    valid = positions >= 0
    pos = positions.clamp_min(0)
    blk = pos // bs
    d_slot = dev_slot[blk]
    h_slot = host_slot[blk]
    on_dev = valid & (d_slot >= 0)
    on_host = valid & ~on_dev & (h_slot >= 0)
    heads = torch.arange(H, device=device)[:, None]
    off = pos % bs

    def flat(slot: torch.Tensor, kv: int) -> torch.Tensor:  # [H, S] row index into pool.kv.view(-1, D)
        return (((slot.clamp_min(0) * L + layer) * 2 + kv) * bs + off) * H + heads

    dev_flat = device_pool.kv.view(-1, D)
    host_flat = host_pool.kv.view(-1, D) if host_pool.num_slots else None
    moved = torch.zeros((), dtype=torch.int64, device=device)

    def read(kv: int) -> torch.Tensor:
        nonlocal moved
        out = dev_flat.index_select(0, flat(d_slot, kv).reshape(-1)).view(H, S, D).masked_fill(~on_dev[..., None], 0)
        if host_flat is None:
            return out
        index = flat(h_slot, kv)

        def load(mask: torch.Tensor) -> torch.Tensor:
            return gather_host_rows(host_flat, index, mask, device)

        if cache is not None:
            got, n = cache.read(kv, pos, on_host, num_tokens, load)
        else:
            got, n = load(on_host), on_host.sum()
        moved = moved + n
        return torch.where(on_host[..., None], got, out)

    k = read(0)
    v = read(1) if values else None
    return k, v, moved


#: Backend of the host-row gather on CUDA (kvstore.kernels.BACKENDS), read from this variable.
#: "torch" by default: the UVA kernel (csrc/gather_rows.cu) compiles here but has not yet run
#: on a GPU; "auto" or "cuda" turns it on.
ROWS_BACKEND_ENV = "KVSTORE_ROWS_BACKEND"
DEFAULT_ROWS_BACKEND = "torch"


def gather_host_rows(src: torch.Tensor, index: torch.Tensor, mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows ``src[index]`` where ``mask`` (zero elsewhere) on ``device``.

    Args:
        src: ``[R, D]`` rows in host memory (pinned, to be read by the kernel).
        index, mask: ``[...]`` int64 row indices and bool, on ``device``.

    Returns ``[..., D]``. On the CPU an ``index_select``. On CUDA the UVA kernel
    (:data:`ROWS_BACKEND_ENV`; no sync), else the torch fallback: the wanted indices come to the
    host (one sync), the CPU gathers those rows and one non-blocking copy brings them over.
    """
    D = src.shape[1]
    if device.type != "cuda":
        return src.index_select(0, index.reshape(-1)).view(*index.shape, D).masked_fill(~mask[..., None], 0)
    from kvstore import kernels  # the backend switch; cupy itself is imported on the kernel path only

    out = torch.zeros((*index.shape, D), dtype=src.dtype, device=device)
    if src.is_pinned() and kernels.resolve_backend(None, device, env=ROWS_BACKEND_ENV, default=DEFAULT_ROWS_BACKEND, what="rows backend") == "cuda":
        _launch_gather_rows(src, index, mask, out)
        return out
    both = torch.stack([mask.reshape(-1).long(), index.reshape(-1)]).cpu()  # the one sync
    picked = torch.from_numpy(np.flatnonzero(both[0].numpy()))
    fetched = src.index_select(0, both[1][picked])
    fetched = fetched.pin_memory().to(device, non_blocking=True) if src.is_pinned() else fetched.to(device)
    out.view(-1, D).index_copy_(0, picked.to(device, non_blocking=True), fetched)
    return out


def _launch_gather_rows(src: torch.Tensor, index: torch.Tensor, mask: torch.Tensor, out: torch.Tensor) -> None:
    """``out[i] = src[index[i]] if mask[i] else 0`` in one launch of csrc/gather_rows.cu (current stream)."""
    from kvstore import kernels

    row_bytes = src.shape[1] * src.element_size()
    if row_bytes % 16 or src.stride(1) != 1 or src.stride(0) != src.shape[1] or src.data_ptr() % 16 or out.data_ptr() % 16:
        raise ShapeError(f"gather_rows: rows of {row_bytes} bytes (contiguous, 16-byte aligned) needed, got {tuple(src.shape)} {src.dtype}")
    if out.dtype != src.dtype or not out.is_contiguous():
        raise ShapeError(f"gather_rows: out {out.dtype} must be contiguous {src.dtype} (no silent casts)")
    n = index.numel()
    if n == 0:
        return
    index = index.reshape(-1).contiguous().long()
    mask = mask.reshape(-1).contiguous().to(torch.uint8)
    vecs = row_bytes // 16
    per_cta = _GATHER_THREADS * _ROWS_UNROLL
    grid = (min(-(-(n * vecs) // per_cta), _ROWS_MAX_CTAS), 1, 1)
    kernel = kernels.load_kernel("gather_rows.cu", "gather_rows", device=out.device)
    kernels.launch(
        kernel, grid, (_GATHER_THREADS, 1, 1),
        (kernels.ptr(src), kernels.ptr(out), kernels.ptr(index), kernels.ptr(mask), kernels.i64(n), kernels.i32(vecs)),
        device=out.device,
    )


def _copy_runs(s_kv: torch.Tensor, d_kv: torch.Tensor, src_starts: np.ndarray, dst_starts: np.ndarray, lengths: np.ndarray) -> None:
    """``d_kv[d:d+n] = s_kv[s:s+n]`` for each run, one ``cudaMemcpyAsync`` each (current stream)."""
    for s0, d0, length in zip(src_starts.tolist(), dst_starts.tolist(), lengths.tolist()):
        d_kv[d0 : d0 + length].copy_(s_kv[s0 : s0 + length], non_blocking=True)


def _h2d_memcpy(s_kv: torch.Tensor, src_slots: np.ndarray, d_kv: torch.Tensor, dst_slots: np.ndarray) -> None:
    """One cudaMemcpyAsync per run of consecutive slots, straight from the host pool."""
    starts, lengths = slot_runs(src_slots, dst_slots)
    _copy_runs(s_kv, d_kv, src_slots[starts], dst_slots[starts], lengths)


def _h2d_uva(s_kv: torch.Tensor, src_slots: np.ndarray, d_kv: torch.Tensor, dst_slots: np.ndarray) -> None:
    """One gather-kernel launch reading the pinned host pool in place."""
    gather_blocks(s_kv, src_slots, d_kv, dst_slots)


def _gather_then_copy_runs(s_kv: torch.Tensor, src_slots: np.ndarray, d_kv: torch.Tensor, dst_slots: np.ndarray) -> None:
    """Pack the source slots on their device, then one copy per run of consecutive destination slots."""
    order = np.argsort(dst_slots, kind="stable")
    index = torch.from_numpy(src_slots[order]).pin_memory().to(s_kv.device, non_blocking=True)
    packed = s_kv.index_select(0, index)
    dst_sorted = dst_slots[order]
    starts = np.flatnonzero(np.diff(dst_sorted, prepend=dst_sorted[0] - 2) != 1)
    lengths = np.diff(np.append(starts, dst_sorted.size))
    _copy_runs(packed, d_kv, starts, dst_sorted[starts], lengths)


#: name -> function issuing a copy of scattered host slots to device slots on the current stream.
#: ``h2d_path="auto"`` picks "memcpy" or "uva" per copy (:func:`choose_h2d_path`).
H2D_PATHS = {
    "memcpy": _h2d_memcpy,
    "uva": _h2d_uva,
}
