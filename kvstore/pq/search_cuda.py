"""Fused PQ search on CUDA: csrc/pq_search.cu behind the signature of kvstore.pq.adc.adc_topk.

:func:`adc_topk` is the public entry: it runs the kernel for CUDA tensors when the backend
says so and :func:`kvstore.pq.adc.adc_topk` (the torch reference, same definitions) otherwise.
:func:`adc_topk_cuda` is the thin wrapper: it checks shape, dtype, device and strides, never
casts, plans the grid and launches on torch's current stream through the generic loader
(:mod:`kvstore.kernels`, the only module that imports cupy).

What the kernel computes is written at the top of csrc/pq_search.cu: ADC scores from the
uint8 codes and the lookup tables, the softmax-normalised sum (or max) over the query heads of
a GQA group (exact softmax: one launch gathers each query's max and normaliser, a second
ranks), and the top-k by radix select, 1 launch (``aggregate=None`` or one query per row) or
2; sorting the k results by score (``sorted=True``, the reference's order) is one torch sort.
The lookup tables come in built (:func:`kvstore.pq.adc.lookup_tables`, one batched GEMM) and
each CTA stages its row's tables in shared memory: rebuilding them per CTA would read every
centroid (``M * K * dsub`` floats per head, 4x the code bytes of a CTA's chunk) again.

Backends (a dict, :data:`BACKENDS`): ``"torch"`` (default), ``"cuda"`` (the kernel; CUDA
tensors only) and ``"auto"`` (the kernel for CUDA tensors when cupy imports). ``backend=None``
reads ``$KVSTORE_PQ_BACKEND``. The default stays ``"torch"`` until tests/pq/test_search_cuda.py
has passed on a GPU.
"""

from __future__ import annotations

import functools
import math

import torch

from kvstore import kernels
from kvstore.errors import ConfigError, KernelError, OutOfRangeError, ShapeError
from kvstore.pq import adc

__all__ = ["BACKEND_ENV", "BACKENDS", "DEFAULT_BACKEND", "adc_topk", "adc_topk_cuda", "plan_chunks", "resolve_backend"]

BACKEND_ENV = "KVSTORE_PQ_BACKEND"
DEFAULT_BACKEND = "torch"

_SOURCE = "pq_search.cu"
_THREADS = 512  # pqs::kThreads
_TOP_BINS = 2048  # pqs::kTopBins
_MODES = {None: 0, "sum": 1, "max": 2}  # pqs::Mode
_QMAX = (1, 2, 4, 8)  # query heads per row the kernel is instantiated for (padded up)
_CTAS_PER_SM = 4
_MIN_CHUNK = 1024
_STATIC_SMEM = 9 * 1024  # the rank kernel's static shared memory (histogram + scratch), rounded up
_SMEM_OPT_IN = 48 * 1024  # dynamic shared memory above this needs the attribute set


BACKENDS = kernels.BACKENDS


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The implementation (``"torch"`` or ``"cuda"``) a search over tensors on ``device`` uses."""
    return kernels.resolve_backend(backend, device, env=BACKEND_ENV, default=DEFAULT_BACKEND, what="PQ backend")


def adc_topk(
    codes: torch.Tensor,
    tables: torch.Tensor,
    k: int,
    *,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
    aggregate: str | None = None,
    scale: float = 1.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Top-``k`` tokens by ADC score (see :func:`kvstore.pq.adc.adc_topk` for every argument).

    Returns ``[R, Q, k]`` (``aggregate=None``) or ``[R, k]`` int64 token indices by decreasing
    score; ties may be broken differently by the two implementations.
    """
    if resolve_backend(backend, codes.device) == "cuda":
        return adc_topk_cuda(codes, tables, k, lo=lo, hi=hi, aggregate=aggregate, scale=scale)
    return adc.adc_topk(codes, tables, k, lo=lo, hi=hi, aggregate=aggregate, scale=scale)


# ------------------------------------------------------------------------------------ plan
def plan_chunks(num_tokens: int, num_rows: int, sm_count: int, *, min_chunk: int) -> tuple[int, int]:
    """Tokens per CTA and CTAs per row: about ``_CTAS_PER_SM`` CTAs per SM over all rows,
    chunks of at least ``min_chunk`` tokens, a multiple of 16 (16-byte vectors never straddle
    two CTAs). Returns ``(chunk, num_chunks)`` with ``chunk * num_chunks >= num_tokens``."""
    if num_tokens < 1 or num_rows < 1 or sm_count < 1 or min_chunk < 1:
        raise ConfigError(f"plan_chunks: every argument must be >= 1, got {num_tokens}, {num_rows}, {sm_count}, {min_chunk}")
    per_row = max(1, -(-_CTAS_PER_SM * sm_count // num_rows))
    chunk = max(min_chunk, -(-num_tokens // per_row))
    chunk = -(-chunk // 16) * 16
    return chunk, -(-num_tokens // chunk)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


class _Workspace:
    """Per-(device, stream) row histograms and arrival counters. The kernel leaves both zero
    when it finishes, so they are zeroed once, at allocation; launches on one stream are ordered."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.hist = torch.zeros((0, _TOP_BINS), dtype=torch.int32, device=device)
        self.counters = torch.zeros(0, dtype=torch.int32, device=device)

    def reserve(self, rows: int) -> None:
        if rows > self.counters.shape[0]:
            self.hist = torch.zeros((rows, _TOP_BINS), dtype=torch.int32, device=self.device)
            self.counters = torch.zeros(rows, dtype=torch.int32, device=self.device)


@functools.cache
def _workspace(device_index: int, stream: int) -> _Workspace:
    return _Workspace(torch.device("cuda", device_index))


# ------------------------------------------------------------------------------ validation
def _describe(t: object) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_inputs(codes, tables, k, lo, hi, aggregate, scale) -> None:
    """Shapes, dtypes and values first (these errors do not need a GPU), then devices."""
    if not isinstance(codes, torch.Tensor) or codes.dim() != 3 or codes.dtype != torch.uint8:
        raise ShapeError(f"adc_topk_cuda: codes must be a uint8 [R, N, M] tensor (no silent casts), got {_describe(codes)}")
    R, N, M = codes.shape
    if not isinstance(tables, torch.Tensor) or tables.dim() != 4 or tables.dtype != torch.float32:
        raise ShapeError(f"adc_topk_cuda: tables must be a float32 [R, Q, M, K] tensor, got {_describe(tables)}")
    if tables.shape[0] != R or tables.shape[2] != M:
        raise ShapeError(f"adc_topk_cuda: tables {tuple(tables.shape)} do not match codes [R={R}, N={N}, M={M}]")
    Q, K = tables.shape[1], tables.shape[3]
    if K < 1 or K > 256 or K & (K - 1):
        raise ShapeError(f"adc_topk_cuda: tables hold K={K} centroids per subspace; the kernel needs a power of two <= 256")
    if aggregate not in _MODES:
        raise ConfigError(f"adc_topk_cuda: aggregate must be one of {list(_MODES)}, got {aggregate!r}")
    if aggregate is not None and Q > _QMAX[-1]:
        raise ShapeError(f"adc_topk_cuda: the kernel aggregates at most {_QMAX[-1]} query heads per row, got Q={Q}")
    if R == 0 or N == 0 or Q == 0 or M == 0:
        raise ShapeError(f"adc_topk_cuda: empty input, codes {tuple(codes.shape)}, tables {tuple(tables.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= N:
        raise OutOfRangeError(f"adc_topk_cuda: k={k!r} must be an int in [1, N={N}]")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ConfigError(f"adc_topk_cuda: scale must be a finite float, got {scale!r}")
    for name, t in (("lo", lo), ("hi", hi)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or tuple(t.shape) != (R,)):
            raise ShapeError(f"adc_topk_cuda: {name} must be an int64 [{R}] tensor or None, got {_describe(t)}")
    device = codes.device
    if device.type != "cuda":
        raise ShapeError(f"adc_topk_cuda: the CUDA kernel needs CUDA tensors, got codes on {device}")
    for name, t in (("tables", tables), ("lo", lo), ("hi", hi)):
        if t is not None and t.device != device:
            raise ShapeError(f"adc_topk_cuda: {name} is on {t.device}, codes on {device}")
    if codes.stride(2) != 1 or (N > 1 and codes.stride(1) != M):
        raise ShapeError(f"adc_topk_cuda: each row's codes must be contiguous [N, M], got strides {codes.stride()}")
    if tables.stride(3) != 1:
        raise ShapeError(f"adc_topk_cuda: tables need a contiguous last dim, got strides {tables.stride()}")
    for name, t in (("lo", lo), ("hi", hi)):
        if t is not None and not t.is_contiguous():
            raise ShapeError(f"adc_topk_cuda: {name} must be contiguous, got strides {t.stride()}")


def _vectorizable(codes: torch.Tensor) -> bool:
    """16-byte code loads: 16 % M == 0 and every row's base 16-byte aligned."""
    R, _, M = codes.shape
    return 16 % M == 0 and codes.data_ptr() % 16 == 0 and (R == 1 or codes.stride(0) % 16 == 0)


# ---------------------------------------------------------------------------------- kernel
def adc_topk_cuda(
    codes: torch.Tensor,
    tables: torch.Tensor,
    k: int,
    *,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
    aggregate: str | None = None,
    scale: float = 1.0,
    sorted: bool = True,
) -> torch.Tensor:
    """csrc/pq_search.cu on CUDA tensors; arguments and result as :func:`kvstore.pq.adc.adc_topk`.

    Args:
        codes: ``[R, N, M]`` uint8, each row's ``[N, M]`` contiguous (rows may be strided, as
            :attr:`kvstore.pq.PQIndex.codes` is).
        tables: ``[R, Q, M, K]`` float32, last dim contiguous, ``K`` a power of two <= 256.
        k: ``1 <= k <= N``.
        lo, hi: optional int64 ``[R]`` candidate bounds.
        aggregate: None, ``"sum"`` or ``"max"`` (at most 8 query heads per row when aggregating).
        scale: softmax scale of the aggregation.
        sorted: order each row by decreasing score (one torch sort); False leaves the k
            indices of a row in no particular order.

    Returns:
        ``[R, Q, k]`` (``aggregate=None``) or ``[R, k]`` int64 token indices.

    Raises:
        ShapeError: wrong dtype, shape, device or strides. OutOfRangeError: bad ``k``.
        ConfigError: bad ``aggregate`` or ``scale``. KernelError: cupy missing, compile or launch failure.
    """
    _check_inputs(codes, tables, k, lo, hi, aggregate, scale)
    R, N, M = codes.shape
    Q, K = tables.shape[1], tables.shape[3]
    per_query = aggregate is None and Q > 1
    mode = _MODES[aggregate] if Q > 1 else 0  # one query: softmax is monotone, rank raw scores
    split = Q if per_query else 1
    q_row = 1 if per_query else Q
    qmax = next(v for v in _QMAX if v >= q_row)
    S = R * split
    if S > 65535:
        raise ShapeError(f"adc_topk_cuda: {S} selection rows exceed the kernel's grid limit of 65535")
    lut_bytes = qmax * M * K * 4
    device = codes.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    # A CTA may opt in to all of an SM's shared memory but the 1 KiB the driver reserves (sm_80+).
    limit = torch.cuda.get_device_properties(index).shared_memory_per_multiprocessor - 1024 - _STATIC_SMEM
    if lut_bytes > limit:
        raise ShapeError(f"adc_topk_cuda: lookup tables of {lut_bytes} bytes (Q<={qmax}, M={M}, K={K}) exceed shared memory ({limit} bytes)")

    vec = _vectorizable(codes)
    chunk, num_chunks = plan_chunks(N, S, _sm_count(index), min_chunk=max(_MIN_CHUNK, 4 * qmax * K))
    npad = -(-N // 16) * 16
    flag = "true" if vec else "false"
    ws = _workspace(index, torch.cuda.current_stream(index).cuda_stream)
    ws.reserve(S)
    keys = torch.empty((S, npad), dtype=torch.int32, device=device)
    out_idx = torch.empty((S, k), dtype=torch.int64, device=device)
    out_val = torch.empty((S, k), dtype=torch.float32, device=device)
    partial = torch.empty((S, num_chunks, qmax, 2), dtype=torch.float32, device=device) if mode else None
    ts = tables.stride()
    common = (
        kernels.ptr(codes), kernels.i64(codes.stride(0)), kernels.ptr(tables),
        kernels.i64(ts[0]), kernels.i64(ts[1]), kernels.i64(ts[2]), kernels.ptr(lo), kernels.ptr(hi),
    )
    grid, block = (num_chunks, S, 1), (_THREADS, 1, 1)
    if mode:
        stats = _kernel(f"pq_stats<{M}, {qmax}, {flag}>", index, lut_bytes)
        kernels.launch(
            stats, grid, block,
            (*common, kernels.i32(Q), kernels.i32(K), kernels.i64(N), kernels.i64(chunk), kernels.f32(scale), kernels.ptr(partial)),
            device=device, shared_mem=lut_bytes,
        )
    rank = _kernel(f"pq_rank<{M}, {qmax}, {flag}>", index, lut_bytes)
    kernels.launch(
        rank, grid, block,
        (
            *common, kernels.i32(split), kernels.i32(q_row), kernels.i32(K), kernels.i64(N), kernels.i64(chunk), kernels.f32(scale),
            kernels.i32(mode), kernels.ptr(partial), kernels.ptr(keys), kernels.i64(npad), kernels.ptr(ws.hist),
            kernels.ptr(ws.counters), kernels.i32(k), kernels.ptr(out_idx), kernels.ptr(out_val),
        ),
        device=device, shared_mem=lut_bytes,
    )
    if sorted:
        out_idx = out_idx.gather(1, out_val.argsort(dim=1, descending=True))
    return out_idx.view(R, Q, k) if aggregate is None else out_idx


def _kernel(name: str, device_index: int, dynamic_smem: int):
    """The compiled instantiation ``name``, allowed ``dynamic_smem`` bytes of dynamic shared memory."""
    kernel = kernels.load_kernel(_SOURCE, name, device=device_index)
    if dynamic_smem > _SMEM_OPT_IN and kernel.max_dynamic_shared_size_bytes < dynamic_smem:
        kernel.max_dynamic_shared_size_bytes = dynamic_smem
    return kernel
