"""Batched k-means: every (head, subspace) group of a PQ index trained at once.

``kmeans(x, k, config)`` clusters ``G`` independent point sets ``x: [G, N, d]`` into ``k``
centroids each and returns ``[G, k, d]``. The torch backend runs Lloyd's algorithm on all
groups together (one batched matmul per iteration, on whatever device ``x`` lives on); the
faiss backend (``config.backend == "faiss"``) hands each group to ``faiss.Kmeans`` on the CPU
and is there as a reference, not for the hot path.

Both subsample at most ``max_points_per_centroid * k`` points per group (the same token
indices for every group, drawn from a seeded generator), so training time does not grow with
the sequence, and both are deterministic for a given seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kvstore.errors import ConfigError, ShapeError

__all__ = ["KMeansConfig", "KMEANS_BACKENDS", "kmeans", "assign"]

#: Elements of the ``[G, chunk, k]`` distance block computed at once by ``assign``: on a CPU a
#: block that stays in cache (4 MiB), on a GPU one large enough to fill the device.
_ASSIGN_BLOCK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}
#: Low mantissa bits of a float32 distance that may carry the centroid index (see ``assign``).
_MAX_PACKED_BITS = 12


@dataclass(frozen=True, kw_only=True)
class KMeansConfig:
    """How centroids are trained.

    Attributes:
        backend: ``"torch"`` (batched Lloyd, CPU or GPU) or ``"faiss"`` (faiss.Kmeans per group, CPU).
        num_iters: Lloyd iterations after initialisation.
        init: ``"sample"`` (k distinct training points) or ``"kmeans++"`` (D^2 sampling,
            torch backend only; faiss always samples).
        max_points_per_centroid: training subsample cap, ``k * max_points_per_centroid`` points per group.
        seed: seed of the subsample and the initialisation.
    """

    backend: str = "torch"
    num_iters: int = 6
    init: str = "sample"
    max_points_per_centroid: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.backend not in KMEANS_BACKENDS:
            raise ConfigError(f"KMeansConfig.backend must be one of {sorted(KMEANS_BACKENDS)}, got {self.backend!r}")
        if self.init not in _INITS:
            raise ConfigError(f"KMeansConfig.init must be one of {sorted(_INITS)}, got {self.init!r}")
        if self.backend == "faiss" and self.init != "sample":
            raise ConfigError(f"KMeansConfig.init={self.init!r} is not available with backend='faiss' (it samples)")
        for name in ("num_iters", "max_points_per_centroid"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"KMeansConfig.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"KMeansConfig.seed must be an int, got {self.seed!r}")


def assign(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every point, group by group.

    Args:
        x: ``[G, N, d]`` float points.
        centroids: ``[G, k, d]`` float centroids (same dtype and device as ``x``).

    Returns:
        ``(codes, sq_dist)``: ``codes: [G, N]`` int64 index of the nearest centroid and
        ``sq_dist: [G, N]`` its squared Euclidean distance (clamped at 0). For float32 points
        and ``k <= 4096`` distances are compared to ``2^-(23 - ceil(log2 k))`` relative
        precision (``2^-15`` at ``k = 256``): centroids closer than that to a tie may swap.
    """
    G, N, _ = x.shape
    k = centroids.shape[1]
    c_norm = centroids.square().sum(-1).unsqueeze(1)  # [G, 1, k]
    codes = torch.empty((G, N), dtype=torch.int64, device=x.device)
    sq_dist = torch.empty((G, N), dtype=x.dtype, device=x.device)
    chunk = max(1, _ASSIGN_BLOCK_ELEMENTS.get(x.device.type, 1 << 24) // (G * k))
    ct = centroids.transpose(1, 2)
    bits = max(1, (k - 1).bit_length())
    packed = x.dtype == torch.float32 and bits <= _MAX_PACKED_BITS
    if packed:
        index = torch.arange(k, dtype=torch.int32, device=x.device)
    for start in range(0, N, chunk):
        xs = x[:, start : start + chunk]
        # ||x - c||^2 - ||x||^2 = ||c||^2 - 2 x.c : the argmin does not need ||x||^2.
        d = torch.baddbmm(c_norm, xs, ct, alpha=-2.0)
        if packed:
            # The centroid index replaces the low mantissa bits of each distance, so a plain
            # min (vectorised, unlike an arg-reduction) carries its own argmin; distances
            # are compared to 2^-(23 - bits) relative precision.
            d.view(torch.int32).bitwise_and_(-(1 << bits)).bitwise_or_(index)
            best = d.amin(dim=-1)
            idx = best.view(torch.int32) & ((1 << bits) - 1)
        else:
            best, idx = d.min(dim=-1)
        codes[:, start : start + chunk] = idx
        sq_dist[:, start : start + chunk] = (best + xs.square().sum(-1)).clamp_min_(0.0)
    return codes, sq_dist


def _subsample(x: torch.Tensor, cap: int, generator: torch.Generator) -> torch.Tensor:
    """At most ``cap`` points per group: the same random token indices in every group."""
    N = x.shape[1]
    if N <= cap:
        return x
    keep = torch.randperm(N, generator=generator)[:cap].sort().values.to(x.device)
    return x.index_select(1, keep)


def _init_sample(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    pick = torch.randperm(x.shape[1], generator=generator)[:k].to(x.device)
    return x.index_select(1, pick).clone()


def _init_kmeanspp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ (D^2 sampling), all groups in lockstep, over at most ``8 * k`` candidate points
    (the seeding is ``k`` sequential steps; a larger pool buys little and costs linearly)."""
    x = _subsample(x, 8 * k, generator)
    G, N, d = x.shape
    rows = torch.arange(G, device=x.device)
    x_norm = x.square().sum(-1)  # [G, N]
    centroids = torch.empty((G, k, d), dtype=x.dtype, device=x.device)
    pick = torch.randint(N, (G,), generator=generator).to(x.device)
    nearest = torch.full((G, N), float("inf"), dtype=x.dtype, device=x.device)
    for j in range(k):
        centroids[:, j] = x[rows, pick]
        c = centroids[:, j]
        dist = x_norm - 2.0 * torch.bmm(x, c.unsqueeze(-1)).squeeze(-1) + c.square().sum(-1, keepdim=True)
        nearest = torch.minimum(nearest, dist.clamp_min_(0.0))
        # multinomial on the CPU generator keeps the draw identical on every device.
        pick = torch.multinomial(nearest.cpu() + 1e-30, 1, generator=generator).squeeze(1).to(x.device)
    return centroids


_INITS: dict[str, Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]] = {
    "sample": _init_sample,
    "kmeans++": _init_kmeanspp,
}


def _torch_kmeans(x: torch.Tensor, k: int, config: KMeansConfig) -> torch.Tensor:
    generator = torch.Generator().manual_seed(config.seed)
    x = _subsample(x, k * config.max_points_per_centroid, generator).float()
    G, N, d = x.shape
    centroids = _INITS[config.init](x, k, generator)
    ones = torch.ones((G, N), dtype=x.dtype, device=x.device)
    for _ in range(config.num_iters):
        codes, _ = assign(x, centroids)
        sums = torch.zeros_like(centroids).scatter_add_(1, codes.unsqueeze(-1).expand(G, N, d), x)
        counts = torch.zeros((G, k), dtype=x.dtype, device=x.device).scatter_add_(1, codes, ones)
        # An empty cluster keeps its previous centroid (it may win points back next round).
        centroids = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp_min(1.0).unsqueeze(-1), centroids)
    return centroids


def _faiss_kmeans(x: torch.Tensor, k: int, config: KMeansConfig) -> torch.Tensor:
    import faiss  # lazy: the GPU box has no faiss

    G, _, d = x.shape
    points = x.detach().float().cpu().numpy()
    out = torch.empty((G, k, d), dtype=torch.float32)
    for g in range(G):  # reference backend: faiss parallelises inside each group
        km = faiss.Kmeans(
            d, k, niter=config.num_iters, seed=config.seed + g,
            max_points_per_centroid=config.max_points_per_centroid, min_points_per_centroid=1,
        )
        km.train(points[g])
        out[g] = torch.from_numpy(km.centroids)
    return out.to(x.device)


#: backend name -> ``fn(x [G, N, d], k, config) -> centroids [G, k, d]``
KMEANS_BACKENDS: dict[str, Callable[[torch.Tensor, int, KMeansConfig], torch.Tensor]] = {
    "torch": _torch_kmeans,
    "faiss": _faiss_kmeans,
}


def kmeans(x: torch.Tensor, k: int, config: KMeansConfig | None = None) -> torch.Tensor:
    """Train ``k`` centroids for each of ``G`` groups.

    Args:
        x: ``[G, N, d]`` float points, ``N >= k``.
        k: centroids per group.
        config: backend, iterations, init, subsample cap and seed (defaults: ``KMeansConfig()``).

    Returns:
        ``[G, k, d]`` float32 centroids on ``x.device``.
    """
    config = config or KMeansConfig()
    if x.dim() != 3:
        raise ShapeError(f"kmeans: x must be [groups, points, dim], got shape {tuple(x.shape)}")
    if x.shape[1] < k:
        raise ShapeError(f"kmeans: {k} centroids need at least {k} points per group, got {x.shape[1]}")
    return KMEANS_BACKENDS[config.backend](x, k, config)
