"""Quality of a token selection against full attention, for one sequence and layer.

A selection is ``positions: [Hkv, S]`` (sorted token positions per KV head; the ``G`` query
heads of a group share their KV head's set). Every metric is computed per query head against
exact attention over all ``N`` keys and averaged over query heads:

* ``recall_at_k``: fraction of the exact top-k tokens (by ``q.k``) that were selected.
* ``attention_mass``: sum of the exact softmax probabilities of the selected tokens.
* ``output_error``: ``||o_sel - o_full|| / ||o_full||`` where ``o_sel`` is attention restricted
  to the selected tokens (softmax renormalised over them), as sparse attention computes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.errors import ShapeError

__all__ = ["SelectionQuality", "selection_mask", "recall_at_k", "attention_mass", "output_error", "needle_hits", "evaluate"]


def _check(queries: torch.Tensor, keys: torch.Tensor) -> int:
    if queries.dim() != 2 or keys.dim() != 3 or queries.shape[1] != keys.shape[2] or queries.shape[0] % keys.shape[0]:
        raise ShapeError(
            f"metrics: expected queries [Hq, D] and keys [Hkv, N, D] with Hq a multiple of Hkv, "
            f"got {tuple(queries.shape)} and {tuple(keys.shape)}"
        )
    return queries.shape[0] // keys.shape[0]


def selection_mask(positions: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``positions: [Hkv, S]`` -> ``[Hkv, num_tokens]`` bool, True at selected tokens."""
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= num_tokens):
        raise ShapeError(f"selection_mask: positions outside [0, {num_tokens})")
    mask = torch.zeros((positions.shape[0], num_tokens), dtype=torch.bool, device=positions.device)
    return mask.scatter_(1, positions, True)


def _logits(queries: torch.Tensor, keys: torch.Tensor, group: int) -> torch.Tensor:
    """Exact ``q.k`` per query head: ``[Hq, N]`` float32."""
    Hkv = keys.shape[0]
    q = queries.float().view(Hkv, group, -1)
    return torch.bmm(q, keys.float().transpose(1, 2)).view(Hkv * group, -1)


def recall_at_k(positions: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor, k: int) -> float:
    """Mean over query heads of ``|selected ∩ exact top-k| / k``."""
    group = _check(queries, keys)
    logits = _logits(queries, keys, group)
    k = min(k, logits.shape[1])
    top = torch.topk(logits, k, dim=-1).indices  # [Hq, k]
    mask = selection_mask(positions, keys.shape[1]).repeat_interleave(group, 0)
    return float(mask.gather(1, top).float().mean())


def attention_mass(positions: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor, scale: float) -> float:
    """Mean over query heads of the exact softmax probability held by the selected tokens."""
    group = _check(queries, keys)
    probs = torch.softmax(_logits(queries, keys, group) * scale, dim=-1)
    mask = selection_mask(positions, keys.shape[1]).repeat_interleave(group, 0)
    return float((probs * mask).sum(-1).mean())


def output_error(positions: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> float:
    """Mean over query heads of the relative L2 error of sparse attention over the selection."""
    group = _check(queries, keys)
    logits = _logits(queries, keys, group) * scale
    mask = selection_mask(positions, keys.shape[1]).repeat_interleave(group, 0)
    v = values.float().repeat_interleave(group, 0)  # [Hq, N, D]
    full = torch.bmm(torch.softmax(logits, -1).unsqueeze(1), v).squeeze(1)
    sparse = torch.bmm(torch.softmax(logits.masked_fill(~mask, float("-inf")), -1).unsqueeze(1), v).squeeze(1)
    return float(((sparse - full).norm(dim=-1) / full.norm(dim=-1).clamp_min(1e-12)).mean())


def needle_hits(positions: torch.Tensor, needles: torch.Tensor) -> float:
    """Fraction of (KV head, needle) pairs whose needle position was selected."""
    if needles.numel() == 0:
        return 1.0
    hit = (positions.unsqueeze(-1) == needles.to(positions.device).view(1, 1, -1)).any(1)  # [Hkv, n]
    return float(hit.float().mean())


@dataclass(frozen=True)
class SelectionQuality:
    """All metrics of one selection (see the module docstring)."""

    recall: float
    mass: float
    output_error: float


def evaluate(positions: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, k: int, scale: float) -> SelectionQuality:
    """recall@k, attention mass and output error of ``positions: [Hkv, S]`` for ``queries: [Hq, D]``
    over ``keys, values: [Hkv, N, D]``."""
    return SelectionQuality(
        recall=recall_at_k(positions, queries, keys, k),
        mass=attention_mass(positions, queries, keys, scale),
        output_error=output_error(positions, queries, keys, values, scale),
    )
