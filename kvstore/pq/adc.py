"""Asymmetric distance computation (ADC): score every encoded token against full-precision queries.

A query sub-vector is multiplied with its subspace's centroids once (the lookup table); a
token's score is then the sum, over subspaces, of the table entries its codes name. This is
the only place that reads codes at search time: ``adc_topk`` is the seam a fused CUDA kernel
(ADC + group aggregation + top-k in one pass) replaces for CUDA tensors; everything else
(PQIndex.search, token selection) calls it.

Shapes use ``R`` for rows (heads, or sequences x heads folded together), ``Q`` for queries per
row, ``N`` for tokens, ``M`` for subspaces and ``K = 2**bits`` for centroids per subspace.
"""

from __future__ import annotations

import torch

__all__ = ["lookup_tables", "adc_scores", "adc_topk", "AGGREGATES"]

#: How the query heads of a GQA group agree on one token set (scores normalised by softmax first).
AGGREGATES = ("sum", "max")


def lookup_tables(queries: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Inner products of query sub-vectors with every centroid of their subspace.

    Args:
        queries: ``[R, Q, D]`` with ``D = M * dsub``.
        centroids: ``[R, M, K, dsub]``.

    Returns:
        ``[R, Q, M, K]`` float32 tables.
    """
    R, Q, D = queries.shape
    M, K, dsub = centroids.shape[1:]
    q = queries.float().reshape(R, Q, M, dsub).transpose(1, 2)  # [R, M, Q, dsub]
    return torch.matmul(q, centroids.transpose(-1, -2)).transpose(1, 2)  # [R, Q, M, K]


def adc_scores(codes: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """ADC scores of all tokens: ``scores[r, q, n] = sum_m tables[r, q, m, codes[r, n, m]]``.

    One gather per (subspace, query) of ``R x N`` table entries, accumulated in place: the
    codes of a subspace are widened to the int64 index ``gather`` wants once (``R x N``
    entries, reused by every query), never all ``M`` subspaces at once (an ``R x N x M`` int64
    index is 8x the codes and, on CPU, costs more to allocate and fill than the gathers).

    Args:
        codes: ``[R, N, M]`` uint8.
        tables: ``[R, Q, M, K]`` float32.

    Returns:
        ``[R, Q, N]`` float32.
    """
    R, N, M = codes.shape
    Q = tables.shape[1]
    out = torch.empty((R, Q, N), dtype=tables.dtype, device=tables.device)
    for m in range(M):
        index = codes[:, :, m].long()  # [R, N]
        for q in range(Q):
            if m == 0:
                torch.gather(tables[:, q, m], 1, index, out=out[:, q])
            else:
                out[:, q].add_(tables[:, q, m].gather(1, index))
    return out


def adc_topk(
    codes: torch.Tensor,
    tables: torch.Tensor,
    k: int,
    *,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
    aggregate: str | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Top-``k`` tokens by ADC score, per row (and per query unless aggregated).

    Torch reference of the fused search: the CUDA kernel of a later issue replaces this
    function for CUDA tensors with the same signature and results.

    Args:
        codes: ``[R, N, M]`` uint8.
        tables: ``[R, Q, M, K]`` float32 lookup tables (``lookup_tables``).
        k: tokens to return, ``k <= N``.
        lo, hi: optional ``[R]`` int64 bounds: only tokens ``lo[r] <= n < hi[r]`` are
            candidates (the others score ``-inf``; if fewer than ``k`` candidates exist the
            trailing indices of that row are arbitrary non-candidates, callers trim them).
        aggregate: ``None`` ranks each query on its own; ``"sum"`` or ``"max"`` first turns
            each query's candidate scores into probabilities (``softmax(scale * score)``) and
            reduces them over the ``Q`` queries of a row (the query heads of a GQA group).
        scale: softmax temperature, ``1/sqrt(head_dim)`` for attention logits.

    Returns:
        ``[R, Q, k]`` int64 token indices if ``aggregate is None`` else ``[R, k]``, each row
        ordered by decreasing score.
    """
    scores = adc_scores(codes, tables)  # [R, Q, N]
    if (lo is not None or hi is not None) and scores.device.type == "cpu":
        # two slice fills per row (rows are few): cheaper on CPU than a masked pass over [R, Q, N]
        R, N = scores.shape[0], scores.shape[-1]
        for r, a, b in zip(range(R), lo.tolist() if lo is not None else [0] * R, hi.tolist() if hi is not None else [N] * R):
            scores[r, :, : max(a, 0)] = float("-inf")
            scores[r, :, max(b, 0) :] = float("-inf")
    elif lo is not None or hi is not None:  # no host sync on a GPU
        n = torch.arange(scores.shape[-1], device=scores.device)
        outside = torch.zeros((scores.shape[0], scores.shape[-1]), dtype=torch.bool, device=scores.device)
        if lo is not None:
            outside |= n < lo.unsqueeze(1)
        if hi is not None:
            outside |= n >= hi.unsqueeze(1)
        scores = scores.masked_fill(outside.unsqueeze(1), float("-inf"))
    if aggregate is not None:
        if tables.shape[1] == 1:
            scores = scores[:, 0]  # softmax is monotone: one query ranks the same either way
        else:
            probs = torch.softmax(scores * scale, dim=-1).nan_to_num_(0.0)  # all -inf rows -> 0
            scores = probs.sum(1) if aggregate == "sum" else probs.amax(1)
    return torch.topk(scores, k, dim=-1, sorted=True).indices
