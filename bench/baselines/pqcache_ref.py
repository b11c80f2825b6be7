"""PQCache's published decode-time selection (Zhang et al., SIGMOD'25; github.com/HugoZHL/PQCache),
reproduced for side-by-side comparison at equal token budget.

What is kept from its code (vq_method/retrieval_based/pq_search.py, multi_core_compressor_v2.py):

* m=2 sub-vectors per head, 6 bits (64 centroids), Euclidean k-means with Lloyd iterations
  (sklearn ``KMeans(init=<sampled points>, n_init=1, max_iter, tol=1e-4)``, its iteration cap
  is at most 10), one independent k-means per (KV head, sub-vector) — here a plain numpy Lloyd
  loop per group, since sklearn is not installed; all prompt tokens after the sinks are
  clustered, no subsample;
* 32 sink tokens excluded from the index; the budget past the sinks split half recent
  window, half top-k (``recent_ratio=0.5``);
* codes held as int64 (``code_book.to(torch.int64)``) and gathered every step;
* scoring: per query head, ``qk_table = q_sub @ centroids^T``, token score = sum over
  sub-vectors of the table at its codes, ``softmax(score / sqrt(D))`` over the candidates,
  summed over the query heads of a GQA group, then top-k;
* centroids are never re-trained. (Its encoding of decode tokens as they leave the window is
  not reproduced: the benchmark scores decode queries against the prompt.)
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["PQCacheRef"]


def _lloyd(x: np.ndarray, init: np.ndarray, max_iter: int, tol: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """sklearn-style Lloyd k-means of one group: ``x: [N, d]`` -> (centroids [k, d], labels [N])."""
    c = init.astype(np.float32).copy()
    x_sq = (x * x).sum(1)
    for _ in range(max_iter):
        d = x_sq[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
        labels = d.argmin(1)
        new = np.zeros_like(c)
        np.add.at(new, labels, x)
        counts = np.bincount(labels, minlength=len(c)).astype(np.float32)
        nonempty = counts > 0
        new[nonempty] /= counts[nonempty, None]
        new[~nonempty] = c[~nonempty]
        shift = float(((new - c) ** 2).sum())
        c = new
        if shift <= tol:
            break
    d = x_sq[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
    return c, d.argmin(1)


class PQCacheRef:
    """PQCache selection for one sequence and layer.

    Args:
        head_dim: D; num_subvec: m (2); bits: b (6); sink_size: 32; max_iter: Lloyd cap (10).
    """

    def __init__(self, head_dim: int, *, num_subvec: int = 2, bits: int = 6, sink_size: int = 32, max_iter: int = 10, seed: int = 0) -> None:
        self.head_dim, self.m, self.k = head_dim, num_subvec, 1 << bits
        self.sink_size, self.max_iter, self.seed = sink_size, max_iter, seed
        self.centroids: torch.Tensor | None = None  # [Hkv, m, k, dsub]
        self.codes: torch.Tensor | None = None  # [Hkv, m, n_coded] int64, token sink_size + j at column j
        self.num_tokens = 0

    @property
    def code_bytes_per_token(self) -> int:
        return 8 * self.m

    def train(self, keys: torch.Tensor) -> None:
        """Prefill: cluster ``keys[:, sink_size:]`` (``keys: [Hkv, N, D]``) per head and sub-vector."""
        H, N, D = keys.shape
        dsub = D // self.m
        xb = keys[:, self.sink_size :].float().reshape(H, N - self.sink_size, self.m, dsub).permute(0, 2, 1, 3).numpy()
        rng = np.random.default_rng(self.seed)
        init_idx = rng.choice(xb.shape[2], size=self.k, replace=False)  # one draw for every group, as its workers do
        centroids = np.empty((H, self.m, self.k, dsub), dtype=np.float32)
        codes = np.empty((H, self.m, xb.shape[2]), dtype=np.int64)
        for h in range(H):  # one k-means job per (head, sub-vector), as its process pool runs them
            for j in range(self.m):
                x = np.ascontiguousarray(xb[h, j])
                centroids[h, j], codes[h, j] = _lloyd(x, x[init_idx], self.max_iter)
        self.centroids = torch.from_numpy(centroids)
        self.codes = torch.from_numpy(codes)
        self.num_tokens = N

    def select(self, queries: torch.Tensor, budget: int) -> torch.Tensor:
        """Tokens for ``queries: [Hq, D]`` within ``budget`` tokens -> ``[Hkv, budget]`` sorted positions."""
        assert self.centroids is not None and self.codes is not None
        H, m, k, dsub = self.centroids.shape
        G = queries.shape[0] // H
        N = self.num_tokens
        recent = (budget - self.sink_size) // 2
        topk = budget - self.sink_size - recent
        n_cand = N - recent - self.sink_size  # candidates: after the sinks, before the window
        q = queries.float().view(H, G, m, dsub).transpose(1, 2)  # [H, m, G, dsub]
        table = torch.matmul(q, self.centroids.transpose(-1, -2))  # [H, m, G, k]
        codes = self.codes[:, :, :n_cand]  # [H, m, n_cand] int64
        weight = torch.gather(table, 3, codes.unsqueeze(2).expand(H, m, G, n_cand)).sum(1)  # [H, G, n_cand]
        score = torch.softmax(weight / math.sqrt(self.head_dim), dim=-1).sum(1)  # [H, n_cand]
        top = score.topk(topk, dim=-1, sorted=False).indices + self.sink_size
        fixed = torch.cat([torch.arange(self.sink_size), torch.arange(N - recent, N)]).to(top.device).expand(H, -1)
        return torch.cat([fixed, top], 1).sort(1).values
