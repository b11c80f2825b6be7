"""Torch reference for multi-segment attention: the semantics every kernel must match.

Runs on any device. Inputs are trusted (the public API in :mod:`kvstore.attn.api` validates
them); scores, softmax and the weighted sum are computed in float32 (float64 for float64
inputs, which the tests use), outputs are returned in the query's dtype and LSEs in the
compute dtype. LSEs are natural-log: ``lse = log(sum_j exp(scale * q . k_j))`` over the
visible keys; a row that sees no key has output 0 and LSE ``-inf``.

Causality is bottom-right aligned, as in FlashAttention: with ``Tq`` queries, query ``i``
sees a key at causal position ``t`` iff ``t < causal_start`` or
``t <= causal_end - Tq + i``. For a segment list the positions are compact token indices,
``causal_start`` is where the last segment begins and ``causal_end`` the total token count,
so the queries are the last ``Tq`` tokens of the last segment and earlier segments are fully
visible. For per-head token sets the positions are sequence positions and
``causal_start = 0``, ``causal_end = seq_len``.

The reference gathers keys into contiguous tensors; the CUDA kernel does not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvstore.attn.segments import BlockSegments

__all__ = [
    "causal_mask",
    "merge_states",
    "multi_segment_attention",
    "multi_segment_attention_merged",
    "paged_attention",
    "paged_token_attention",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def causal_mask(num_queries: int, positions: torch.Tensor, *, causal_start: int, causal_end: int) -> torch.Tensor:
    """Which keys each query sees (module docstring): bool ``[..., Tq, Tk]`` for positions ``[..., Tk]``."""
    limit = causal_end - num_queries + torch.arange(num_queries, device=positions.device)
    pos = positions.unsqueeze(-2)
    return (pos < causal_start) | (pos <= limit.unsqueeze(-1))


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, visible: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of every query head over its KV head's keys.

    Args:
        q: ``[Tq, Hq, D]``; query head ``h`` reads KV head ``h // (Hq // Hkv)``.
        k, v: ``[Hkv, Tk, D]``.
        visible: bool ``[Tq, Tk]`` (shared by all heads) or ``[Hkv, Tq, Tk]``; None = all.

    Returns:
        ``out [Tq, Hq, D]`` and ``lse [Tq, Hq]``, both in the compute dtype.
    """
    num_q, num_heads, dim = q.shape
    num_kv_heads, num_keys, _ = k.shape
    group = num_heads // num_kv_heads
    cd = _compute_dtype(q.dtype)
    # The G query heads of a KV head share its keys: one [G * Tq, D] x [D, Tk] product per KV head.
    qg = q.to(cd).reshape(num_q, num_kv_heads, group, dim).permute(1, 2, 0, 3)  # [Hkv, G, Tq, D]
    scores = torch.bmm(qg.reshape(num_kv_heads, group * num_q, dim), k.to(cd).transpose(1, 2)) * scale
    scores = scores.view(num_kv_heads, group, num_q, num_keys)
    if visible is not None:
        scores = scores.masked_fill(~(visible if visible.dim() == 2 else visible.unsqueeze(1)), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hkv, G, Tq]; -inf where nothing is visible
    finite_lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - finite_lse.unsqueeze(-1))  # exactly 0 for masked keys
    out = torch.bmm(probs.view(num_kv_heads, group * num_q, num_keys), v.to(cd))  # [Hkv, G * Tq, D]
    out = out.view(num_kv_heads, group, num_q, dim)
    return out.permute(2, 0, 1, 3).reshape(num_q, num_heads, dim), lse.permute(2, 0, 1).reshape(num_q, num_heads)


def merge_states(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge S partial attention states by their LSEs.

    Args:
        outs: ``[Tq, S, Hq, D]``, each state's normalised output.
        lses: ``[Tq, S, Hq]``, natural-log LSE of each state; ``-inf`` = empty state, whose
            output is ignored (it may hold anything, NaN included).

    Returns:
        ``out [Tq, Hq, D]`` in ``outs.dtype`` and ``lse [Tq, Hq]`` in the compute dtype;
        rows whose states are all empty get output 0 and LSE ``-inf``.
    """
    cd = _compute_dtype(outs.dtype)
    lses = lses.to(cd)
    row_max = lses.amax(dim=1, keepdim=True) if lses.shape[1] else torch.full_like(lses[:, :1], float("-inf"))
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(lses - row_max)  # [Tq, S, Hq]; 0 for empty states
    total = weights.sum(dim=1)  # [Tq, Hq]
    w = weights.unsqueeze(-1)
    summed = torch.where(w > 0, w * outs.to(cd), torch.zeros((), dtype=cd, device=outs.device)).sum(dim=1)
    nonempty = (total > 0).unsqueeze(-1)
    out = torch.where(nonempty, summed / torch.where(nonempty, total.unsqueeze(-1), 1.0), 0.0)
    return out.to(outs.dtype), row_max.squeeze(1) + torch.log(total)


def multi_segment_attention(
    q: torch.Tensor,
    segments: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    causal_last: bool = True,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over a list of KV segments, gathered into one sequence.

    Args:
        q: ``[Tq, Hq, D]``.
        segments: ``[(k [Tk_s, Hkv, D], v [Tk_s, Hkv, D]), ...]``.
        causal_last: the queries are the last Tq tokens of the last segment (bottom-right mask).
        scale: softmax scale, default ``D ** -0.5``.

    Returns:
        ``out [Tq, Hq, D]`` (q's dtype), ``lse [Tq, Hq]``.
    """
    k = torch.cat([seg_k for seg_k, _ in segments]) if segments else q.new_zeros((0, 1, q.shape[-1]))
    v = torch.cat([seg_v for _, seg_v in segments]) if segments else k
    visible = None
    if causal_last:
        total = k.shape[0]
        positions = torch.arange(total, device=q.device)
        visible = causal_mask(q.shape[0], positions, causal_start=total - segments[-1][0].shape[0], causal_end=total)
    out, lse = _attend(q, k.transpose(0, 1), v.transpose(0, 1), _scale(q, scale), visible)
    return out.to(q.dtype), lse


def multi_segment_attention_merged(
    q: torch.Tensor,
    segments: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    causal_last: bool = True,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same result as :func:`multi_segment_attention`, one attention per segment + :func:`merge_states`."""
    outs, lses = [], []
    for index, (k, v) in enumerate(segments):
        visible = None
        if causal_last and index == len(segments) - 1:
            positions = torch.arange(k.shape[0], device=q.device)
            visible = causal_mask(q.shape[0], positions, causal_start=0, causal_end=k.shape[0])
        out, lse = _attend(q, k.transpose(0, 1), v.transpose(0, 1), _scale(q, scale), visible)
        outs.append(out)
        lses.append(lse)
    if not outs:
        return multi_segment_attention(q, segments, causal_last=False, scale=scale)
    out, lse = merge_states(torch.stack(outs, dim=1), torch.stack(lses, dim=1))
    return out.to(q.dtype), lse


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    segments: BlockSegments,
    *,
    causal_last: bool = True,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over segments that are runs of pool slots.

    Args:
        q: ``[Tq, Hq, D]``.
        k_cache, v_cache: ``[num_slots, block_size, Hkv, D]`` (strided per-layer pool views).
        segments: the runs of slots; the last segment is the causal one.

    Returns:
        ``out [Tq, Hq, D]`` (q's dtype), ``lse [Tq, Hq]``.
    """
    slot, offset = segments.token_slots()
    k = k_cache[slot, offset]  # [T, Hkv, D] (a gathered copy)
    v = v_cache[slot, offset]
    visible = None
    if causal_last:
        positions = torch.arange(segments.num_tokens, device=q.device)
        visible = causal_mask(
            q.shape[0], positions, causal_start=segments.last_start, causal_end=segments.num_tokens
        )
    out, lse = _attend(q, k.transpose(0, 1), v.transpose(0, 1), _scale(q, scale), visible)
    return out.to(q.dtype), lse


def paged_token_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    positions: torch.Tensor,
    *,
    seq_len: int | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention where every KV head reads its own set of token positions.

    Args:
        q: ``[Tq, Hq, D]``.
        k_cache, v_cache: ``[num_slots, block_size, Hkv, D]``.
        block_table: int ``[num_blocks]``, the slot of each of the sequence's blocks.
        positions: int ``[Hkv, K]``, the token positions KV head ``h`` attends to.
        seq_len: when given, the queries are the last Tq of ``seq_len`` tokens and a query does
            not see later positions; when None every listed token is visible.

    Returns:
        ``out [Tq, Hq, D]`` (q's dtype), ``lse [Tq, Hq]``.
    """
    block_size = k_cache.shape[1]
    pos = positions.long()
    slot = block_table.long()[pos // block_size]  # [Hkv, K]
    heads = torch.arange(k_cache.shape[2], device=q.device).unsqueeze(1)
    k = k_cache[slot, pos % block_size, heads]  # [Hkv, K, D]
    v = v_cache[slot, pos % block_size, heads]
    visible = None if seq_len is None else causal_mask(q.shape[0], pos, causal_start=0, causal_end=seq_len)
    out, lse = _attend(q, k, v, _scale(q, scale), visible)
    return out.to(q.dtype), lse
