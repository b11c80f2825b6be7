"""Decode-time token selection: sinks + recent window + top-k by PQ score over the rest.

For one sequence of ``n`` tokens and a budget of ``b`` tokens (``b < n``; otherwise every
token is selected) the selection of each KV head is

* the first ``min(num_sinks, b)`` tokens (attention sinks),
* the last ``min(recent_window, b - sinks)`` tokens (locality),
* the ``b - sinks - window`` tokens of highest PQ score among the rest,

so every head selects exactly ``b`` tokens. The ``G`` query heads sharing a KV head agree on
one set: each query's scores over the candidates are turned into probabilities
(``softmax(scale * score)``) and summed over the group (``aggregate="sum"``, as PQCache does)
or maxed (``"max"``). A batch of sequences of different lengths is scored in one call: codes
are padded to the longest sequence and tokens outside each sequence's candidate range are
masked (kvstore.pq.adc.adc_topk).

**Exact re-ranking** (``refine > 1``, FAISS's IndexRefine): ADC ranks the candidates, the best
``ceil(refine * k)`` of them plus the index's outliers (keys no centroid fits, see
kvstore.pq.index) form a shortlist, and the shortlist is re-scored with the exact keys, which
the caller supplies (``keys``: the store gathers them from its blocks), before the final
top-k. Codes stay 4 B per token; the price is reading the shortlist's keys, ``refine`` times
the K bytes of the selected tokens plus the outliers'. ``refine = 1`` (default) is PQCache's
selection: codes only.

Syncs: none, but the NaN/Inf check of the queries (``check_finite=True``, the default; the
store defers it) and :attr:`Selection.blocks`, which reads the positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import numpy as np
import torch

from kvstore import validate
from kvstore.errors import ConfigError, IndexStateError, NonFiniteError, ShapeError
from kvstore.pq.adc import AGGREGATES, lookup_tables
from kvstore.pq.search_cuda import adc_topk  # fused CUDA kernel when enabled, the torch reference otherwise
from kvstore.pq.index import PQIndex
from kvstore.syncs import upload

__all__ = ["Budget", "KeySource", "SelectionConfig", "Selection", "gather_keys", "resolve_budget", "select_exact", "select_tokens", "window_selection"]

#: A token budget: an int number of tokens (>= 1) or a float fraction of the sequence in (0, 1].
Budget = Union[int, float]

#: Exact keys of a sequence for re-ranking: all of them, ``[Hkv, N, D]``, or a gather
#: ``fn(positions: [Hkv, C] int64) -> [Hkv, C, D]`` (a position of -1 is no candidate: any row will do).
KeySource = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


@dataclass(frozen=True, kw_only=True)
class SelectionConfig:
    """How a budget is spent.

    Attributes:
        num_sinks: leading tokens always kept (4, StreamingLLM's count of attention sinks).
        recent_window: trailing tokens always kept (none by default: a recent token that matters
            wins its place by score; a forced window only displaces tokens that scored higher).
        aggregate: ``"sum"`` or ``"max"`` of the softmax-normalised scores of a GQA group.
        refine: shortlist factor of exact re-ranking (>= 1; 1 scores by codes only).

    PQCache forces 32 sinks and a recent window (bench/baselines/pqcache_ref.py keeps them). At
    a 1/16 budget 32 + 128 is 160 of the 512 tokens of an 8K context. On kvstore's synthetic
    workload a forced window lowers recall with re-ranking and with 4-byte codes, while mass
    and error barely move; only coarse codes (2 subspaces of 6 bits), whose scores miss
    the recent tokens that matter, gain from it (bench/RESULTS.md, "Forced tokens"). Nothing
    here was measured on a real model's attention: set ``recent_window`` for models whose
    recent tokens need a guarantee.
    """

    num_sinks: int = 4
    recent_window: int = 0
    aggregate: str = "sum"
    refine: float = 1.0

    def __post_init__(self) -> None:
        for name in ("num_sinks", "recent_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"SelectionConfig.{name} must be an int >= 0, got {value!r}")
        if self.aggregate not in AGGREGATES:
            raise ConfigError(f"SelectionConfig.aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        if isinstance(self.refine, bool) or not isinstance(self.refine, (int, float)) or not 1.0 <= self.refine < math.inf:
            raise ConfigError(f"SelectionConfig.refine must be a finite number >= 1, got {self.refine!r}")


@dataclass(frozen=True)
class Selection:
    """The tokens one decode step reads for one sequence and layer.

    Attributes:
        positions: ``[Hkv, S]`` int64 on the index's device, each row sorted ascending, no
            duplicates; every head selects the same number ``S`` of tokens.
        num_tokens: tokens of the sequence when selected.
        block_size: tokens per block (what :attr:`blocks` counts in).
    """

    positions: torch.Tensor
    num_tokens: int
    block_size: int

    @property
    def blocks(self) -> torch.Tensor:
        """``[nb]`` int64 sorted distinct block indices (``position // block_size``, into the
        sequence's block table) holding any selected token of any head, as a CPU tensor. It
        reads the positions (a sync on CUDA); :meth:`kvstore.store.KVStore.attend` does not need it."""
        return torch.unique(self.positions // self.block_size).cpu()


def resolve_budget(budget: Budget, num_tokens: int) -> int:
    """Tokens a budget buys in a sequence of ``num_tokens``: an integer (Python or numpy) as is,
    a float fraction ``f`` as ``ceil(f * num_tokens)``; never more than ``num_tokens`` (a budget
    above the sequence's length selects every token: exact attention)."""
    if validate.is_integer(budget):
        if budget < 1:
            raise ConfigError(f"budget must be an int >= 1 or a float in (0, 1], got {int(budget)}")
        return min(int(budget), num_tokens)
    if isinstance(budget, (float, np.floating)) and 0.0 < budget <= 1.0:
        return min(num_tokens, max(1, math.ceil(float(budget) * num_tokens)))
    raise ConfigError(f"budget must be an int >= 1 or a float in (0, 1], got {validate.show(budget)}")


def _split(budget: int, num_tokens: int, config: SelectionConfig) -> tuple[int, int, int]:
    """``(sinks, window, topk)`` for a budget smaller than the sequence."""
    sinks = min(config.num_sinks, budget)
    window = min(config.recent_window, budget - sinks)
    return sinks, window, budget - sinks - window


def _assemble(heads: int, num_tokens: int, sinks: int, window: int, top: torch.Tensor | None, device, block_size: int) -> Selection:
    """Sinks + window (+ ``top: [heads, k]``) -> sorted per-head positions and their blocks."""
    fixed = torch.cat(
        [torch.arange(sinks, device=device), torch.arange(num_tokens - window, num_tokens, device=device)]
    ).expand(heads, -1)
    positions = fixed if top is None else torch.cat([fixed, top], 1)
    positions = positions.sort(dim=1).values
    return Selection(positions=positions, num_tokens=num_tokens, block_size=block_size)


def window_selection(heads: int, num_tokens: int, budget: Budget, *, config: SelectionConfig, block_size: int, device=None) -> Selection:
    """The selection without an index (too few tokens to train one yet): sinks + the most recent tokens."""
    b = resolve_budget(budget, num_tokens)
    sinks = min(config.num_sinks, b)
    return _assemble(heads, num_tokens, sinks, b - sinks, None, device, block_size)


def _check_queries(index: PQIndex, queries: torch.Tensor, i: int, *, finite: bool) -> None:
    H, D = index.num_heads, index.head_dim
    assert H is not None
    if queries.dim() != 2 or queries.shape[1] != D or queries.shape[0] % H:
        raise ShapeError(f"select_tokens: queries[{i}] must be [Hq, {D}] with Hq a multiple of {H} KV heads, got {tuple(queries.shape)}")
    if queries.device != index.device:
        raise ShapeError(f"select_tokens: queries[{i}] on {queries.device}, index on {index.device}")
    if finite and not bool(torch.isfinite(queries).all()):
        raise NonFiniteError(f"select_tokens: queries[{i}] contain NaN/Inf values")


def select_tokens(
    indices: Sequence[PQIndex],
    queries: Sequence[torch.Tensor] | torch.Tensor,
    budgets: Budget | Sequence[Budget],
    *,
    config: SelectionConfig | None = None,
    block_size: int = 16,
    scale: float | None = None,
    keys: Sequence[KeySource] | None = None,
    check_finite: bool = True,
) -> list[Selection]:
    """Select the tokens of one layer for a batch of sequences.

    Args:
        indices: one trained PQIndex per sequence (this layer's), all with the same heads,
            head_dim, subspaces, bits and device; sequence ``i`` has ``indices[i].ntotal`` tokens.
        queries: ``[B, Hq, D]`` (or B tensors ``[Hq, D]``), ``Hq = G * Hkv``.
        budgets: one budget for all sequences or one per sequence (see ``resolve_budget``).
        config: sinks, window and GQA aggregation.
        block_size: tokens per block, to report the blocks.
        scale: softmax scale of the aggregation, default ``1/sqrt(D)``.
        keys: one KeySource per sequence, required when ``config.refine > 1``; a gather is given
            -1 for candidates that are not (their rows are never scored).
        check_finite: reject NaN/Inf queries (reads a flag: a sync on CUDA); False when the
            caller checks them itself.

    Returns:
        One Selection per sequence.
    """
    config = config or SelectionConfig()
    B = len(indices)
    if len(queries) != B:
        raise ShapeError(f"select_tokens: {len(queries)} query tensors for {B} sequences")
    budgets = list(budgets) if isinstance(budgets, (list, tuple)) else [budgets] * B
    if len(budgets) != B:
        raise ShapeError(f"select_tokens: {len(budgets)} budgets for {B} sequences")
    if config.refine > 1 and (keys is None or len(keys) != B):
        got = "none" if keys is None else f"{len(keys)}"
        raise ConfigError(f"select_tokens: refine={config.refine} re-ranks with exact keys; pass keys for each of the {B} sequences (got {got})")
    if B == 0:
        return []
    first = indices[0]
    for i, index in enumerate(indices):
        if not index.is_trained:
            raise IndexStateError(f"select_tokens: the index of sequence {i} is not trained")
        same = (index.num_heads, index.head_dim, index.num_subspaces, index.bits, index.device)
        if same != (first.num_heads, first.head_dim, first.num_subspaces, first.bits, first.device):
            raise ShapeError(f"select_tokens: index {i} {index!r} differs from index 0 {first!r}")
        _check_queries(index, queries[i], i, finite=check_finite)
    sizes = [resolve_budget(b, index.ntotal) for b, index in zip(budgets, indices)]
    H, device = first.num_heads, first.device
    assert H is not None

    results: list[Selection | None] = [None] * B
    ranked = []  # sequences that need top-k: (i, sinks, window, topk)
    for i, (index, b) in enumerate(zip(indices, sizes)):
        n = index.ntotal
        if b >= n:
            results[i] = _assemble(H, n, n, 0, None, device, block_size)
            continue
        sinks, window, top = _split(b, n, config)
        if top == 0:
            results[i] = _assemble(H, n, sinks, window, None, device, block_size)
        else:
            ranked.append((i, sinks, window, top))

    if ranked:
        rows = [indices[i] for i, *_ in ranked]
        n_max = max(index.ntotal for index in rows)
        if len(rows) == 1:
            codes = rows[0].codes
        else:  # pad to the longest sequence; the padding is masked by hi
            codes = torch.zeros((len(rows), H, n_max, first.num_subspaces), dtype=torch.uint8, device=device)
            for r, index in enumerate(rows):
                codes[r, :, : index.ntotal] = index.codes
            codes = codes.view(len(rows) * H, n_max, first.num_subspaces)
        centroids = torch.stack([index.centroids for index in rows]).flatten(0, 1)  # [R*H, M, K, dsub]
        q = torch.stack([queries[i] for i, *_ in ranked]).view(len(rows) * H, -1, first.head_dim)  # [R*H, G, D]
        tables = lookup_tables(q, centroids)
        lo = upload(np.repeat([s for _, s, _, _ in ranked], H), device)
        hi = upload(np.repeat([indices[i].ntotal - w for i, _, w, _ in ranked], H), device)
        scale = scale if scale is not None else 1.0 / math.sqrt(first.head_dim)
        short = [min(math.ceil(config.refine * t), indices[i].ntotal - w - s) for i, s, w, t in ranked]
        k = max(short)
        top = adc_topk(codes, tables, k, lo=lo, hi=hi, aggregate=config.aggregate, scale=scale).view(len(rows), H, k)
        for r, (i, sinks, window, t) in enumerate(ranked):
            picked = top[r, :, :t]
            if config.refine > 1:
                assert keys is not None
                picked = _rerank(
                    queries[i], keys[i], top[r, :, : short[r]], sinks, indices[i].ntotal - window, t,
                    aggregate=config.aggregate, scale=scale, index=indices[i],
                )
            results[i] = _assemble(H, indices[i].ntotal, sinks, window, picked, device, block_size)
    return results  # type: ignore[return-value]


def gather_keys(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``keys: [H, N, D]`` at per-head ``positions: [H, C]`` -> ``[H, C, D]`` (a -1 position gives key 0)."""
    return keys.gather(1, positions.to(keys.device).clamp_min(0)[..., None].expand(-1, -1, keys.shape[2]))


def select_exact(
    keys: torch.Tensor, queries: torch.Tensor, budget: Budget, *, config: SelectionConfig | None = None,
    block_size: int = 16, scale: float | None = None,
) -> Selection:
    """The oracle selection of one sequence: sinks + window + the top-k by exact scores over every
    key (``keys: [Hkv, N, D]``, ``queries: [Hq, D]``), aggregated over each GQA group as
    :func:`select_tokens` does. The ceiling of any selector at this budget; it reads every key."""
    config = config or SelectionConfig()
    H, n, D = keys.shape
    b = resolve_budget(budget, n)
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    if b >= n:
        return _assemble(H, n, n, 0, None, keys.device, block_size)
    sinks, window, top = _split(b, n, config)
    if top == 0:
        return _assemble(H, n, sinks, window, None, keys.device, block_size)
    everything = torch.arange(sinks, n - window, device=keys.device).expand(H, -1)
    picked = _rerank(queries, keys, everything, sinks, n - window, top, aggregate=config.aggregate, scale=scale)
    return _assemble(H, n, sinks, window, picked, keys.device, block_size)


def _rerank(
    queries: torch.Tensor, keys: KeySource, shortlist: torch.Tensor, lo: int, hi: int, k: int,
    *, aggregate: str, scale: float, index: PQIndex | None = None,
) -> torch.Tensor:
    """The ``k`` best of ``shortlist: [H, C]`` plus the ``index``'s outliers in ``[lo, hi)``, by exact score.

    Returns ``[H, k]`` int64 positions. ``queries: [Hq, D]``; ``keys`` as in ``select_tokens``.
    """
    H, D = shortlist.shape[0], queries.shape[1]
    cand, invalid = shortlist, (shortlist < lo) | (shortlist >= hi)
    if index is not None and index.outlier_slots.shape[1]:  # an outlier already shortlisted is scored once
        outliers = index.outlier_slots.to(shortlist.device)  # [H, O], -1 past each head's count
        cand = torch.cat([shortlist, outliers], 1)  # [H, C']
        listed = torch.zeros((H, index.ntotal), dtype=torch.bool, device=shortlist.device).scatter_(1, shortlist, True)
        invalid = torch.cat([invalid, (outliers < lo) | (outliers >= hi) | listed.gather(1, outliers.clamp_min(0))], 1)
    cand = cand.masked_fill(invalid, -1)  # not read, and its score is masked below
    if isinstance(keys, torch.Tensor):
        if keys.dim() != 3 or keys.shape[0] != H or keys.shape[2] != D or keys.shape[1] < hi:
            raise ShapeError(f"select_tokens: keys must be [{H}, >= {hi}, {D}], got {tuple(keys.shape)}")
        k_exact = gather_keys(keys, cand)
    else:
        k_exact = keys(cand)
        if tuple(k_exact.shape) != (H, cand.shape[1], D):
            raise ShapeError(f"select_tokens: the key gather returned {tuple(k_exact.shape)}, expected {(H, cand.shape[1], D)}")
    k_exact = k_exact.to(device=queries.device, dtype=torch.float32)
    logits = torch.matmul(queries.float().view(H, -1, D), k_exact.transpose(1, 2)) * scale  # [H, G, C']
    logits = logits.masked_fill(invalid[:, None], float("-inf"))
    probs = torch.softmax(logits, -1)
    score = probs.sum(1) if aggregate == "sum" else probs.amax(1)
    score = score.masked_fill(invalid, -1.0)
    return cand.gather(1, score.topk(k, -1).indices)  # k <= valid candidates: never a -1
