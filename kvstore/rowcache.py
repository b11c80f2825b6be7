"""A device cache of host-tier rows for the sparse read of decode steps.

Selection changes little from one decode step to the next: most of the tokens layer l reads
at step t+1 it also read at step t. :class:`RowCache` keeps, for one sequence and one layer,
the K and V rows (one row = one token of one KV head, ``head_dim`` values) that recent
fetches brought from the host tier, so a later fetch moves only the rows it misses. It is
the per-layer device cache of DESIGN.md's data flow, step 3, at row granularity: a block's
layer slice holds ``block_size`` rows of which a selection reads one or two, so caching
whole blocks would move many rows nobody reads.

Layout, per kind (0 = K, 1 = V) and KV head: ``rows [2, H, C + 1, D]`` with ``C`` slots
(column ``C`` is a dump slot that masked writes land in), ``slot_of [2, H, N + 1]`` the slot
each token's row occupies (-1: not cached; column ``N`` is a dump), ``token_of [2, H, C + 1]``
the token in each slot (-1: empty) and ``stamp [2, H, C + 1]`` the step that last read it.
Replacement is LRU per head: a fetch's misses take the least recently read slots that the
same fetch does not hit.

Invariants: ``slot_of[j, h, token_of[j, h, c]] == c`` for every filled slot, and a token's
cached row equals its row in the store (tokens are written once; a recomputed block gets
the same values), so a hit is exact. The cache is dropped with its sequence.

Syncs: none. Everything is fixed-shape device work decided by host integers (the fetch
width and the capacity).
"""

from __future__ import annotations

import torch

__all__ = ["RowCache"]


class RowCache:
    """Cached K/V rows of one sequence's one layer, ``capacity`` slots per KV head and kind.

    Args:
        capacity: slots per KV head for each of K and V.
        num_heads, head_dim, dtype, device: the rows' shape and where they live.
    """

    def __init__(self, capacity: int, num_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        assert capacity > 0
        self.capacity = capacity
        H, C = num_heads, capacity
        self.rows = torch.zeros((2, H, C + 1, head_dim), dtype=dtype, device=device)
        self.token_of = torch.full((2, H, C + 1), -1, dtype=torch.int64, device=device)
        self.stamp = torch.full((2, H, C + 1), -1, dtype=torch.int64, device=device)
        self.slot_of = torch.full((2, H, 1), -1, dtype=torch.int64, device=device)
        self._step = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rows, self.token_of, self.stamp, self.slot_of))

    def read(self, kind: int, positions: torch.Tensor, want: torch.Tensor, num_tokens: int, load) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of ``positions`` where ``want``, from the cache, loading what it misses.

        Args:
            kind: 0 for K rows, 1 for V rows.
            positions: ``[H, S]`` int64 token positions (any value where not ``want``); the
                wanted positions of a head are distinct.
            want: ``[H, S]`` bool, the rows to serve (the host-tier rows of the fetch).
            num_tokens: the sequence's tokens in this layer (bounds the positions).
            load: ``load(mask [H, S]) -> [H, S, D]``, the rows at ``mask`` read from the host
                tier (anything elsewhere); the cache calls it once, with its misses.

        Returns:
            ``rows [H, S, D]`` (zero where not ``want``) and ``misses``, an int64 device
            scalar: the rows ``load`` had to move. The misses take the least recently read
            slots this fetch does not hit; when there are fewer such slots than misses
            (``S > C / 2``), the misses past them are served but not kept.
        """
        H, S = positions.shape
        C = self.capacity
        self._grow(num_tokens)
        self._step += 1
        slot_of, token_of, stamp, rows = self.slot_of[kind], self.token_of[kind], self.stamp[kind], self.rows[kind]
        dump_token = slot_of.shape[1] - 1
        pos = torch.where(want, positions, dump_token)
        slot = slot_of.gather(1, pos)
        hit = want & (slot >= 0)
        miss = want & ~hit
        loaded = load(miss)
        keep = min(S, C - S)  # slots surely free of this fetch's hits (at most S of them)
        if keep > 0:
            held = torch.zeros((H, C + 1), dtype=torch.int64, device=pos.device).scatter_add_(1, torch.where(hit, slot, C), hit.long())
            age = stamp.masked_fill(held > 0, torch.iinfo(torch.int64).max)
            age[:, C] = torch.iinfo(torch.int64).max
            victims = age.topk(keep, dim=1, largest=False).indices  # [H, keep]
            rank = miss.long().cumsum(1) - 1  # the i-th miss takes the i-th victim
            kept = miss & (rank < keep)
            taken = torch.where(kept, victims.gather(1, rank.clamp(0, keep - 1)), C)
            evicted = token_of.gather(1, taken)
            slot_of.scatter_(1, torch.where(kept & (evicted >= 0), evicted, dump_token), -1)
            slot_of.scatter_(1, torch.where(kept, pos, dump_token), taken)
            token_of.scatter_(1, taken, torch.where(kept, pos, -1))
            token_of[:, C] = -1
            rows.scatter_(1, taken[..., None].expand(-1, -1, rows.shape[2]), loaded.to(rows.dtype))
            stamp.scatter_(1, taken, self._step)
        stamp.scatter_(1, torch.where(hit, slot, C), self._step)
        out = rows.gather(1, torch.where(hit, slot, C)[..., None].expand(-1, -1, rows.shape[2]))
        out = torch.where(miss[..., None], loaded.to(rows.dtype), out)
        return out.masked_fill(~want[..., None], 0), miss.sum()

    def _grow(self, num_tokens: int) -> None:
        """Make ``slot_of`` cover ``num_tokens`` tokens (plus its dump column); host-decided."""
        have = self.slot_of.shape[2] - 1
        if num_tokens <= have:
            return
        grown = max(num_tokens, 2 * have)
        extra = torch.full((2, self.slot_of.shape[1], grown - have), -1, dtype=torch.int64, device=self.slot_of.device)
        self.slot_of = torch.cat([self.slot_of[..., :have], extra, self.slot_of[..., have:]], dim=2)
