"""Public multi-segment attention API: input validation and backend dispatch.

Three ways to name the keys, one semantics (see :mod:`kvstore.attn.reference`):

* :func:`multi_segment_attention`: a list of ``(k, v)`` tensors, one per segment;
* :func:`paged_attention`: segments as runs of slots in the store's pool (:class:`BlockSegments`),
  read in place through the per-layer views ``k_cache, v_cache: [num_slots, block_size, Hkv, D]``;
* :func:`paged_token_attention`: every KV head reads its own token positions (PQ selection)
  through the sequence's block table.

All return ``(out [Tq, Hq, D] in q's dtype, lse [Tq, Hq] float32, natural log)``; partial results
combine with :func:`merge_states`. Bad input raises ShapeError / OutOfRangeError / ConfigError
naming the value, before anything is written.

Backends (a dict, :data:`BACKENDS`): ``"torch"`` runs the reference (any device); ``"cuda"`` runs
csrc/multi_segment_attention.cu through cupy (CUDA tensors only); ``"auto"`` picks the kernel for
CUDA tensors when cupy imports and the reference otherwise. ``backend=None`` reads the
environment variable ``KVSTORE_ATTN_BACKEND`` and falls back to :data:`DEFAULT_BACKEND`.

:data:`DEFAULT_BACKEND` is ``"torch"``: the kernel compiles (nvcc and NVRTC) but has not yet run
on a GPU. Once ``tests/attn/test_kernel.py`` passes on one, it becomes ``"auto"``; until then
set ``KVSTORE_ATTN_BACKEND=auto`` (or pass ``backend="cuda"``) to use the kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from kvstore import kernels, validate
from kvstore.attn import kernel, reference
from kvstore.attn.segments import BlockSegments
from kvstore.errors import ConfigError, OutOfRangeError, ShapeError

__all__ = [
    "BACKEND_ENV",
    "BACKENDS",
    "DEFAULT_BACKEND",
    "HEAD_DIMS",
    "check_scale",
    "merge_states",
    "multi_segment_attention",
    "paged_attention",
    "paged_token_attention",
    "resolve_backend",
]

BACKEND_ENV = "KVSTORE_ATTN_BACKEND"
DEFAULT_BACKEND = "torch"
HEAD_DIMS = (64, 128, 256)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


BACKENDS = kernels.BACKENDS


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The implementation (``"torch"`` or ``"cuda"``) a call with tensors on ``device`` uses."""
    return kernels.resolve_backend(backend, device, env=BACKEND_ENV, default=DEFAULT_BACKEND)


# ---------------------------------------------------------------------------------- validation
def _check_query(q: torch.Tensor) -> None:
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ShapeError(f"q must be a [Tq, Hq, D] tensor, got {_describe(q)}")
    if q.dtype not in DTYPES:
        raise ShapeError(f"q.dtype must be one of {DTYPES}, got {q.dtype}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ShapeError(f"head_dim must be one of {HEAD_DIMS}, got q of shape {tuple(q.shape)}")
    if q.shape[0] < 1 or q.shape[1] < 1:
        raise ShapeError(f"q needs at least one token and one head, got shape {tuple(q.shape)}")


def _describe(t: object) -> str:
    return f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_like_q(name: str, t: object, q: torch.Tensor, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != ndim:
        raise ShapeError(f"{name} must be a {layout} tensor, got {_describe(t)}")
    if t.dtype != q.dtype:
        raise ShapeError(f"{name}.dtype {t.dtype} differs from q.dtype {q.dtype} (no silent casts)")
    if t.device != q.device:
        raise ShapeError(f"{name} is on {t.device}, q on {q.device}")
    if t.shape[-1] != q.shape[-1]:
        raise ShapeError(f"{name} has head_dim {t.shape[-1]}, q has {q.shape[-1]}")


def _check_heads(q: torch.Tensor, num_kv_heads: int) -> None:
    if num_kv_heads < 1 or q.shape[1] % num_kv_heads:
        raise ShapeError(f"query heads Hq={q.shape[1]} must be a multiple of KV heads Hkv={num_kv_heads}")


def check_scale(scale: float | None) -> None:
    """A softmax scale: None (``D ** -0.5``) or a positive finite Python or numpy number, not a bool."""
    number = validate.is_integer(scale) or isinstance(scale, (float, np.floating))
    if scale is not None and not (number and 0 < scale < math.inf):
        raise ConfigError(f"scale must be a positive finite number or None, got {scale!r}")


def _check_outputs(q: torch.Tensor, out: torch.Tensor | None, lse: torch.Tensor | None) -> None:
    if out is not None and (not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype
                            or out.device != q.device):  # fmt: skip
        raise ShapeError(f"out must be {q.dtype} {tuple(q.shape)} on {q.device}, got {_describe(out)}")
    if lse is not None and (not isinstance(lse, torch.Tensor) or lse.shape != q.shape[:2]
                            or lse.dtype != torch.float32 or lse.device != q.device):  # fmt: skip
        raise ShapeError(f"lse must be float32 {tuple(q.shape[:2])} on {q.device}, got {_describe(lse)}")


def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    layout = "[num_slots, block_size, Hkv, D]"
    _check_like_q("k_cache", k_cache, q, 4, layout)
    _check_like_q("v_cache", v_cache, q, 4, layout)
    if k_cache.shape != v_cache.shape:
        raise ShapeError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    _check_heads(q, k_cache.shape[2])


def _check_causal(q: torch.Tensor, last_tokens: int, what: str) -> None:
    if last_tokens < q.shape[0]:
        raise ShapeError(
            f"causal_last: the {q.shape[0]} queries must be the last tokens of the last segment, "
            f"but {what} has only {last_tokens} tokens"
        )


def _into(
    result: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor | None, lse: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference results, copied into caller-given outputs when there are any; LSE in float32."""
    res_out, res_lse = result
    res_lse = res_lse.float()
    if out is not None:
        res_out = out.copy_(res_out)
    if lse is not None:
        res_lse = lse.copy_(res_lse)
    return res_out, res_lse


# ---------------------------------------------------------------------------------- public API
def multi_segment_attention(
    q: torch.Tensor,
    segments: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    causal_last: bool = True,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over several KV segments, merged by log-sum-exp.

    Args:
        q: ``[Tq, Hq, D]``, D in (64, 128, 256); fp32, fp16 or bf16 (accumulation is fp32).
        segments: ``[(k [Tk_s, Hkv, D], v [Tk_s, Hkv, D]), ...]`` in q's dtype and device;
            Hq must be a multiple of Hkv (GQA). An empty segment (Tk_s = 0) contributes nothing.
        causal_last: the queries are the last Tq tokens of the last segment (bottom-right causal
            mask, as in FlashAttention); earlier segments are fully visible. False: every key
            is visible.
        scale: softmax scale, default ``D ** -0.5``.
        out, lse: optional outputs ``[Tq, Hq, D]`` (q's dtype) and ``[Tq, Hq]`` float32.
        backend: ``"auto"``, ``"torch"``, ``"cuda"`` or None (``$KVSTORE_ATTN_BACKEND``).

    Returns:
        ``out [Tq, Hq, D]``, ``lse [Tq, Hq]`` (natural log; ``-inf`` for a row that sees nothing).
    """
    _check_query(q)
    if not isinstance(segments, (list, tuple)):
        raise ShapeError(f"segments must be a list of (k, v) pairs, got {type(segments).__name__}")
    num_kv_heads = None
    for index, pair in enumerate(segments):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ShapeError(f"segments[{index}] must be a (k, v) pair, got {type(pair).__name__}")
        k, v = pair
        _check_like_q(f"segments[{index}].k", k, q, 3, "[Tk, Hkv, D]")
        _check_like_q(f"segments[{index}].v", v, q, 3, "[Tk, Hkv, D]")
        if k.shape != v.shape:
            raise ShapeError(f"segments[{index}]: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
        if num_kv_heads is None:
            num_kv_heads = k.shape[1]
            _check_heads(q, num_kv_heads)
        elif k.shape[1] != num_kv_heads:
            raise ShapeError(f"segments[{index}] has {k.shape[1]} KV heads, segments[0] has {num_kv_heads}")
    if causal_last:
        if not segments:
            raise ShapeError("causal_last needs at least one segment (the one holding the queries)")
        _check_causal(q, segments[-1][0].shape[0], "the last segment")
    check_scale(scale)
    _check_outputs(q, out, lse)
    if resolve_backend(backend, q.device) == "cuda":
        return kernel.multi_segment_attention(q, segments, causal_last=causal_last, scale=scale, out=out, lse=lse)
    return _into(reference.multi_segment_attention(q, segments, causal_last=causal_last, scale=scale), out, lse)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    segments: BlockSegments,
    *,
    causal_last: bool = True,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-segment attention over runs of blocks in the pool, read where they lie.

    Args:
        q: ``[Tq, Hq, D]`` (as in :func:`multi_segment_attention`).
        k_cache, v_cache: ``[num_slots, block_size, Hkv, D]``, e.g. ``pool.layer_view(layer, 0)``
            and ``pool.layer_view(layer, 1)`` (strided views; nothing is copied).
        segments: the segments as runs of slots; their block size must be the cache's.
        causal_last, scale, out, lse, backend: as in :func:`multi_segment_attention`.

    Returns:
        ``out [Tq, Hq, D]``, ``lse [Tq, Hq]``.

    Raises:
        OutOfRangeError: a slot id >= num_slots.
    """
    _check_query(q)
    _check_cache(q, k_cache, v_cache)
    if not isinstance(segments, BlockSegments):
        raise ShapeError(f"segments must be BlockSegments, got {type(segments).__name__}")
    if segments.device != q.device:
        raise ShapeError(f"segments live on {segments.device}, q on {q.device}")
    if segments.block_size != k_cache.shape[1]:
        raise ShapeError(f"segments.block_size={segments.block_size} but the cache's block size is {k_cache.shape[1]}")
    if segments.max_slot >= k_cache.shape[0]:
        raise OutOfRangeError(f"segments use slot {segments.max_slot}, the cache has {k_cache.shape[0]} slots")
    if causal_last:
        _check_causal(q, segments.last_tokens, "the last segment")
    check_scale(scale)
    _check_outputs(q, out, lse)
    if resolve_backend(backend, q.device) == "cuda":
        return kernel.paged_attention(
            q, k_cache, v_cache, segments, causal_last=causal_last, scale=scale, out=out, lse=lse
        )
    return _into(
        reference.paged_attention(q, k_cache, v_cache, segments, causal_last=causal_last, scale=scale), out, lse
    )


def paged_token_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    positions: torch.Tensor,
    *,
    seq_len: int | None = None,
    scale: float | None = None,
    check_indices: bool = True,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention where each KV head reads its own token positions (PQ selection).

    Args:
        q: ``[Tq, Hq, D]``.
        k_cache, v_cache: ``[num_slots, block_size, Hkv, D]`` pool views.
        block_table: int32 ``[num_blocks]``, the slot of each block of the sequence (entries no
            listed position falls in are never read, so non-resident blocks may hold anything).
        positions: int32 ``[Hkv, K]``, the token positions KV head ``h`` attends to (sorted
            ascending reads memory best; K may be 0).
        seq_len: when given, the queries are the last Tq of ``seq_len`` tokens and do not see
            later positions (bottom-right causal); None: every listed token is visible.
        check_indices: verify every position and the slot it maps to are in range
            (OutOfRangeError otherwise). This reads the indices on the host, a device sync on
            CUDA; pass False on hot paths whose indices are trusted. Unchecked out-of-range
            entries are skipped by the kernel, never read.
        scale, out, lse, backend: as in :func:`multi_segment_attention`.

    Returns:
        ``out [Tq, Hq, D]``, ``lse [Tq, Hq]``.
    """
    _check_query(q)
    _check_cache(q, k_cache, v_cache)
    num_slots, block_size, num_kv_heads, _ = k_cache.shape
    for name, t, ndim in (("block_table", block_table, 1), ("positions", positions, 2)):
        if not isinstance(t, torch.Tensor) or t.dim() != ndim or t.dtype != torch.int32:
            raise ShapeError(f"{name} must be an int32 {ndim}-D tensor (no silent casts), got {_describe(t)}")
        if t.device != q.device:
            raise ShapeError(f"{name} is on {t.device}, q on {q.device}")
    if positions.shape[0] != num_kv_heads:
        raise ShapeError(f"positions must be [Hkv={num_kv_heads}, K], got {tuple(positions.shape)}")
    capacity = block_table.shape[0] * block_size
    if seq_len is not None and not (isinstance(seq_len, int) and q.shape[0] <= seq_len <= capacity):
        raise ShapeError(
            f"seq_len={seq_len!r} must be an int in [Tq={q.shape[0]}, block_table capacity={capacity}]"
        )
    if check_indices and positions.numel():
        limit = capacity if seq_len is None else seq_len
        pos = positions.detach().cpu()
        bad = pos[(pos < 0) | (pos >= limit)]
        if bad.numel():
            raise OutOfRangeError(f"positions {bad[:8].tolist()} outside [0, {limit})")
        slots = block_table.detach().cpu()[pos.long() // block_size]
        bad = slots[(slots < 0) | (slots >= num_slots)]
        if bad.numel():
            raise OutOfRangeError(
                f"block_table maps listed positions to slots {bad[:8].tolist()} outside [0, {num_slots})"
            )
    check_scale(scale)
    _check_outputs(q, out, lse)
    if resolve_backend(backend, q.device) == "cuda":
        return kernel.paged_token_attention(
            q, k_cache, v_cache, block_table, positions, seq_len=seq_len, scale=scale, out=out, lse=lse
        )
    ref = reference.paged_token_attention(q, k_cache, v_cache, block_table, positions, seq_len=seq_len, scale=scale)
    return _into(ref, out, lse)


def merge_states(
    outs: torch.Tensor, lses: torch.Tensor, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge S partial attention states of the same queries (natural-log LSEs).

    Args:
        outs: ``[Tq, S, Hq, D]``, each state's normalised output (fp32, fp16 or bf16).
        lses: float32 ``[Tq, S, Hq]``; a state with LSE ``-inf`` is empty and its output is
            ignored (NaN allowed).
        backend: as in :func:`multi_segment_attention`.

    Returns:
        ``out [Tq, Hq, D]`` in ``outs.dtype`` and ``lse [Tq, Hq]`` float32; a row whose states
        are all empty gets output 0 and LSE ``-inf``.
    """
    if not isinstance(outs, torch.Tensor) or outs.dim() != 4 or outs.dtype not in DTYPES:
        raise ShapeError(f"outs must be a [Tq, S, Hq, D] tensor of one of {DTYPES}, got {_describe(outs)}")
    if not isinstance(lses, torch.Tensor) or lses.shape != outs.shape[:3] or lses.dtype != torch.float32:
        raise ShapeError(f"lses must be float32 {tuple(outs.shape[:3])}, got {_describe(lses)}")
    if lses.device != outs.device:
        raise ShapeError(f"lses is on {lses.device}, outs on {outs.device}")
    if resolve_backend(backend, outs.device) == "cuda":
        return kernel.merge_states(outs, lses)
    return _into(reference.merge_states(outs, lses), None, None)
