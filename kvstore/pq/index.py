"""PQIndex: a product-quantized key index, FAISS-like and batched over heads.

Each head's ``head_dim`` channels are cut into ``num_subspaces`` (M) contiguous sub-vectors of
``dsub = head_dim / M`` channels; each subspace of each head has its own codebook of
``K = 2**bits`` centroids, trained by batched k-means over all heads x subspaces at once.
A key is stored as M uint8 codes (one byte per subspace code even when ``bits < 8``), so an
index over N tokens and H heads holds ``H * N * M`` bytes: 4 bytes per token per head at M=4,
1/64 of the fp16 key at head_dim 128.

Lifecycle, as in FAISS: ``train(keys)`` learns centroids (and records how well they fit the
training keys); ``add(keys)`` appends codes (called once at prefill and on every decode
append); ``search``/``scores`` rank the added tokens by maximum inner product through ADC
(kvstore.pq.adc); ``reset`` drops the codes but keeps the training. Centroids and codes live
on the device of the keys passed to ``train``.

**Outliers.** A few keys fit no centroid (a needle: a fact stated once, in a direction no
other key shares); their ADC scores are badly off. ``train`` sets a per-head threshold, the
``1 - outlier_fraction`` quantile of the training keys' relative quantization error, and
``add`` records the positions of the keys above it (int64 per outlier: at 1% that is 0.08 B
per token per head). The index cannot score them better itself; selection with exact
re-ranking (kvstore.pq.select, ``SelectionConfig.refine``) always re-scores them exactly.
The outlier buffer holds ``2 * outlier_fraction`` of the code capacity, twice what keys that
fit the training distribution produce; more outliers than that means the keys drifted away
from the codebooks: the extra ones are not recorded and :attr:`outliers_overflowed` is set
(re-training, which kvstore.pq.sequence does, starts afresh).

Syncs. ``add`` and the search never wait for the device (the outlier bookkeeping stays there);
``add(check_finite=True)`` (the default) and the other checks of values read one flag (a sync on
CUDA); :attr:`outliers` reads the counts to trim its width (a sync: :attr:`outlier_slots` does not).

Invariants: ``codes[:, :ntotal]`` are valid; ``ntotal <= capacity``; the code buffer grows by
doubling, so ``add`` is amortised O(tokens added); ``_outliers[h, :min(count, cap)]`` are
the outlier positions of head ``h``, ascending, all ``< ntotal``; every other entry is -1.
"""

from __future__ import annotations

import math

import torch

from kvstore import validate
from kvstore.errors import ConfigError, IndexStateError, NonFiniteError, OutOfRangeError, ShapeError
from kvstore.pq.adc import adc_scores, lookup_tables
from kvstore.pq.search_cuda import adc_topk  # fused CUDA kernel when enabled, the torch reference otherwise
from kvstore.pq.kmeans import KMeansConfig, assign, kmeans

__all__ = ["PQIndex"]

_MIN_CAPACITY = 256


#: the largest head_dim an index takes: well above any model's (64-256), far below what would
#: overflow a codebook's allocation
MAX_HEAD_DIM = 2**16


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    """``value`` as an int in ``[lo, hi]`` (inclusive), else ConfigError naming it."""
    return validate.integer(value, f"PQIndex: {name}", lo=lo, hi=None if hi is None else hi + 1)


class PQIndex:
    """Product-quantized inner-product index over ``H`` heads.

    Args:
        head_dim: channels per head (D), a multiple of ``num_subspaces``.
        num_subspaces: M, sub-vectors per key (= code bytes per token per head).
        bits: 4..8, ``2**bits`` centroids per subspace.
        kmeans: how centroids are trained.
        outlier_fraction: in [0, 1): share of the training keys, by quantization error, whose
            error marks a key as an outlier (0 records none).
    """

    def __init__(
        self, head_dim: int, num_subspaces: int = 4, bits: int = 8, *, kmeans: KMeansConfig | None = None,
        outlier_fraction: float = 0.01,
    ) -> None:
        head_dim = _check_int("head_dim", head_dim, 1, MAX_HEAD_DIM)
        num_subspaces = _check_int("num_subspaces", num_subspaces, 1)
        bits = _check_int("bits", bits, 4, 8)
        if head_dim % num_subspaces:
            raise ConfigError(f"PQIndex: head_dim={head_dim} is not a multiple of num_subspaces={num_subspaces}")
        if kmeans is not None and not isinstance(kmeans, KMeansConfig):
            raise ConfigError(f"PQIndex: kmeans must be a KMeansConfig, got {type(kmeans).__name__}")
        outlier_fraction = validate.number(outlier_fraction, "PQIndex: outlier_fraction", lo=0.0, hi=1.0, hi_open=True)
        self.head_dim = head_dim
        self.num_subspaces = num_subspaces
        self.bits = bits
        self.kmeans_config = kmeans or KMeansConfig()
        self.outlier_fraction = float(outlier_fraction)
        self.outlier_threshold: torch.Tensor | None = None  # [H] relative error above which a key is an outlier
        self._outliers: torch.Tensor | None = None  # [H, capacity + 1] int64 positions, -1 = none; the last column is a dump
        self._outlier_capacity = 0
        self._outlier_counts: torch.Tensor | None = None  # [H] int64
        self.centroids: torch.Tensor | None = None  # [H, M, K, dsub] float32
        self.train_error: torch.Tensor | None = None  # [H] mean relative quantization error of the training keys
        self._codes: torch.Tensor | None = None  # [H, capacity, M] uint8
        self.ntotal = 0

    # ------------------------------------------------------------------ properties
    @property
    def num_centroids(self) -> int:
        return 1 << self.bits

    @property
    def subspace_dim(self) -> int:
        return self.head_dim // self.num_subspaces

    @property
    def is_trained(self) -> bool:
        return self.centroids is not None

    @property
    def num_heads(self) -> int | None:
        """H, fixed by ``train`` (None before)."""
        return None if self.centroids is None else self.centroids.shape[0]

    @property
    def device(self) -> torch.device | None:
        return None if self.centroids is None else self.centroids.device

    @property
    def codes(self) -> torch.Tensor:
        """``[H, ntotal, M]`` uint8 codes of the added tokens (a view)."""
        self._require_trained("codes")
        assert self._codes is not None
        return self._codes[:, : self.ntotal]

    @property
    def outliers(self) -> torch.Tensor:
        """``[H, O]`` int64 outlier positions per head, ascending, padded with -1 (``O`` = the most
        any head has; reading it is a sync on CUDA)."""
        slots = self.outlier_slots
        width = int((slots >= 0).sum(1).max()) if slots.numel() else 0
        return slots[:, :width]

    @property
    def outlier_slots(self) -> torch.Tensor:
        """``[H, capacity]`` int64 outlier positions per head, ascending, padded with -1 (a view, no sync)."""
        self._require_trained("outliers")
        assert self._outliers is not None
        return self._outliers[:, : self._outlier_capacity]

    @property
    def outliers_overflowed(self) -> torch.Tensor:
        """A bool device scalar: some outliers were not recorded since the last training (drift)."""
        self._require_trained("outliers_overflowed")
        assert self._outlier_counts is not None
        return (self._outlier_counts > self._outlier_capacity).any()

    @property
    def code_bytes_per_token(self) -> int:
        """Bytes of codes one token costs per head (= num_subspaces)."""
        return self.num_subspaces

    def __repr__(self) -> str:
        return (
            f"PQIndex(head_dim={self.head_dim}, num_subspaces={self.num_subspaces}, bits={self.bits}, "
            f"heads={self.num_heads}, ntotal={self.ntotal}, device={self.device})"
        )

    # ------------------------------------------------------------------ checks
    def _require_trained(self, op: str) -> None:
        if self.centroids is None:
            raise IndexStateError(f"PQIndex.{op}: the index is not trained; call train(keys) first")

    def _check_keys(self, op: str, keys: torch.Tensor, *, trained: bool = True, finite: bool = True) -> None:
        if not isinstance(keys, torch.Tensor) or keys.dim() != 3:
            shape = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
            raise ShapeError(f"PQIndex.{op}: expected keys [heads, tokens, head_dim], got {shape}")
        if not keys.is_floating_point():
            raise ShapeError(f"PQIndex.{op}: keys must be floating point, got {keys.dtype}")
        if keys.device.type == "meta":
            raise ShapeError(f"PQIndex.{op}: keys on the meta device hold no values")
        if keys.requires_grad:
            raise ShapeError(f"PQIndex.{op}: keys require grad; the index is inference-only, pass them detached")
        if keys.shape[2] != self.head_dim:
            raise ShapeError(f"PQIndex.{op}: head_dim {keys.shape[2]} != index head_dim {self.head_dim}")
        if trained:
            if keys.shape[0] != self.num_heads:
                raise ShapeError(f"PQIndex.{op}: {keys.shape[0]} heads != index heads {self.num_heads}")
            if keys.device != self.device:
                raise ShapeError(f"PQIndex.{op}: keys on {keys.device}, index on {self.device}")
        if finite and not bool(torch.isfinite(keys).all()):
            bad = int((~torch.isfinite(keys)).sum())
            raise NonFiniteError(f"PQIndex.{op}: keys contain {bad} NaN/Inf values")

    def _check_queries(self, op: str, queries: torch.Tensor) -> None:
        if not isinstance(queries, torch.Tensor) or queries.dim() != 3:
            shape = tuple(queries.shape) if isinstance(queries, torch.Tensor) else type(queries).__name__
            raise ShapeError(f"PQIndex.{op}: expected queries [heads, queries, head_dim], got {shape}")
        if not queries.is_floating_point():
            raise ShapeError(f"PQIndex.{op}: queries must be floating point, got {queries.dtype}")
        if queries.shape[0] != self.num_heads or queries.shape[2] != self.head_dim:
            raise ShapeError(
                f"PQIndex.{op}: queries {tuple(queries.shape)} do not match index heads={self.num_heads}, "
                f"head_dim={self.head_dim}"
            )
        if queries.device != self.device:
            raise ShapeError(f"PQIndex.{op}: queries on {queries.device}, index on {self.device}")
        if not bool(torch.isfinite(queries).all()):
            raise NonFiniteError(f"PQIndex.{op}: queries contain NaN/Inf values")

    # ------------------------------------------------------------------ subspace layout
    def _split(self, keys: torch.Tensor) -> torch.Tensor:
        """``[H, N, D]`` -> ``[H * M, N, dsub]`` float32 (one k-means group per head x subspace)."""
        H, N, _ = keys.shape
        M, dsub = self.num_subspaces, self.subspace_dim
        return keys.float().reshape(H, N, M, dsub).permute(0, 2, 1, 3).reshape(H * M, N, dsub)

    def _encode(self, keys: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes ``[H, N, M]`` uint8 and relative squared error ``[H, N]`` of ``keys`` under ``centroids``."""
        H, N, _ = keys.shape
        M, K, dsub = centroids.shape[1:]
        codes, sq = assign(self._split(keys), centroids.reshape(H * M, K, dsub))  # [H*M, N]
        err = sq.view(H, M, N).sum(1) / keys.float().square().sum(-1).clamp_min(1e-12)
        return codes.view(H, M, N).transpose(1, 2).to(torch.uint8), err

    # ------------------------------------------------------------------ FAISS-like API
    def train(self, keys: torch.Tensor) -> None:
        """Learn the codebooks of every head and subspace from ``keys: [H, N, D]`` (``N >= 2**bits``).

        Re-training replaces the codebooks and drops the codes (as FAISS, re-``add`` after).
        Fixes H and the device of the index.
        """
        self._check_keys("train", keys, trained=False)
        if keys.shape[1] < self.num_centroids:
            raise ShapeError(
                f"PQIndex.train: {keys.shape[1]} keys cannot train {self.num_centroids} centroids (bits={self.bits})"
            )
        H = keys.shape[0]
        M, K, dsub = self.num_subspaces, self.num_centroids, self.subspace_dim
        centroids = kmeans(self._split(keys), K, self.kmeans_config).to(keys.device).view(H, M, K, dsub)
        sample = keys[:, :: max(1, keys.shape[1] // (K * self.kmeans_config.max_points_per_centroid))]
        _, err = self._encode(sample, centroids)
        self.centroids = centroids
        self.train_error = err.mean(1)
        if self.outlier_fraction > 0:
            self.outlier_threshold = torch.quantile(err, 1.0 - self.outlier_fraction, dim=1)
        else:
            self.outlier_threshold = torch.full((H,), float("inf"), device=keys.device)
        self._codes = torch.empty((H, _MIN_CAPACITY, M), dtype=torch.uint8, device=keys.device)
        self._outlier_capacity = 0
        self._outliers = torch.full((H, 1), -1, dtype=torch.int64, device=keys.device)
        self._outlier_counts = torch.zeros(H, dtype=torch.int64, device=keys.device)
        self._grow_outliers()
        self.ntotal = 0

    def encode(self, keys: torch.Tensor) -> torch.Tensor:
        """Codes of ``keys: [H, N, D]`` -> ``[H, N, M]`` uint8 (state unchanged)."""
        self._require_trained("encode")
        self._check_keys("encode", keys)
        assert self.centroids is not None
        return self._encode(keys, self.centroids)[0]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``codes: [H, N, M]`` uint8 -> ``[H, N, D]`` float32 (the centroids
        named). Codes must be below ``2**bits`` (checked: a sync on CUDA)."""
        self._require_trained("decode")
        assert self.centroids is not None
        H, M = self.num_heads, self.num_subspaces
        if not isinstance(codes, torch.Tensor) or codes.dim() != 3 or codes.shape[0] != H or codes.shape[2] != M:
            got = tuple(codes.shape) if isinstance(codes, torch.Tensor) else validate.show(codes)
            raise ShapeError(f"PQIndex.decode: expected codes [{H}, tokens, {M}], got {got}")
        if codes.dtype != torch.uint8:
            raise ShapeError(f"PQIndex.decode: codes must be uint8, got {codes.dtype}")
        if codes.numel() and int(codes.max()) >= self.num_centroids:
            raise OutOfRangeError(f"PQIndex.decode: code {int(codes.max())} out of range [0, {self.num_centroids}) (bits={self.bits})")
        N = codes.shape[1]
        idx = codes.long().permute(0, 2, 1).unsqueeze(-1).expand(H, M, N, self.subspace_dim)
        return torch.gather(self.centroids, 2, idx).permute(0, 2, 1, 3).reshape(H, N, self.head_dim)

    def add(self, keys: torch.Tensor, *, check_finite: bool = True) -> torch.Tensor:
        """Encode ``keys: [H, N, D]`` and append their codes (token positions ``ntotal..ntotal+N-1``).

        ``check_finite=False`` skips the NaN/Inf check (a sync on CUDA); the caller checks.

        Returns:
            ``[H, N]`` relative squared quantization error of the added keys,
            ``||k - decode(encode(k))||^2 / ||k||^2`` (what the drift monitor tracks).
        """
        self._require_trained("add")
        self._check_keys("add", keys, finite=check_finite)
        assert self.centroids is not None and self._codes is not None
        codes, err = self._encode(keys, self.centroids)
        assert self.outlier_threshold is not None
        self._reserve(self.ntotal + codes.shape[1])
        self._append_outliers(err > self.outlier_threshold[:, None], self.ntotal)
        self._append_codes(codes)
        return err

    def _outlier_room(self) -> int:
        """Outlier positions the buffer holds per head for the current code capacity."""
        assert self._codes is not None
        return math.ceil(2 * self.outlier_fraction * self._codes.shape[1]) if self.outlier_fraction > 0 else 0

    def _grow_outliers(self) -> None:
        """Widen the outlier buffer to :meth:`_outlier_room` (plus the dump column ``[:, capacity]``)."""
        assert self._outliers is not None
        cap = self._outlier_room()
        if cap <= self._outlier_capacity:
            return
        grown = torch.full((self._outliers.shape[0], cap + 1), -1, dtype=torch.int64, device=self._outliers.device)
        grown[:, : self._outlier_capacity] = self._outliers[:, : self._outlier_capacity]
        self._outliers = grown
        self._outlier_capacity = cap

    def _append_outliers(self, flags: torch.Tensor, start: int) -> None:
        """Record the positions ``start + j`` where ``flags: [H, n]`` is set, per head, on the
        device (no sync): each flagged key goes to its head's next free column, keys past the
        capacity to the dump column, which is cleared after."""
        assert self._outliers is not None and self._outlier_counts is not None
        cap = self._outlier_capacity
        rank = torch.cumsum(flags, 1) - 1 + self._outlier_counts[:, None]
        col = torch.where(flags & (rank < cap), rank, cap)
        pos = torch.arange(start, start + flags.shape[1], device=flags.device).expand_as(col)
        self._outliers.scatter_(1, col, pos)
        self._outliers[:, cap] = -1
        self._outlier_counts = self._outlier_counts + flags.sum(1)

    def _reserve(self, end: int) -> None:
        """Grow the code buffer (by doubling) and the outlier buffer with it to hold ``end`` tokens."""
        assert self._codes is not None
        if end > self._codes.shape[1]:
            grown = torch.empty(
                (self._codes.shape[0], max(end, 2 * self._codes.shape[1]), self.num_subspaces),
                dtype=torch.uint8, device=self._codes.device,
            )
            grown[:, : self.ntotal] = self._codes[:, : self.ntotal]
            self._codes = grown
            self._grow_outliers()

    def _append_codes(self, codes: torch.Tensor) -> None:
        assert self._codes is not None
        end = self.ntotal + codes.shape[1]
        self._reserve(end)
        self._codes[:, self.ntotal : end] = codes
        self.ntotal = end

    def lookup_tables(self, queries: torch.Tensor) -> torch.Tensor:
        """``queries: [H, Q, D]`` -> ADC tables ``[H, Q, M, K]``."""
        self._require_trained("lookup_tables")
        self._check_queries("lookup_tables", queries)
        assert self.centroids is not None
        return lookup_tables(queries, self.centroids)

    def scores(self, queries: torch.Tensor) -> torch.Tensor:
        """Approximate inner products of ``queries: [H, Q, D]`` with every added key -> ``[H, Q, ntotal]``."""
        return adc_scores(self.codes, self.lookup_tables(queries))

    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Maximum-inner-product search by ADC.

        Args:
            queries: ``[H, Q, D]``.
            k: neighbours per query, ``1 <= k <= ntotal``.

        Returns:
            ``[H, Q, k]`` int64 token positions, by decreasing approximate score.
        """
        self._require_trained("search")
        k = validate.integer(k, f"PQIndex.search: k (at most ntotal={self.ntotal})", lo=1, hi=self.ntotal + 1, error=OutOfRangeError)
        return adc_topk(self.codes, self.lookup_tables(queries), k)

    def reset(self) -> None:
        """Drop every added code (and outlier); keep the codebooks (FAISS semantics)."""
        self.ntotal = 0
        if self._outlier_counts is not None:
            self._outlier_counts.zero_()
            self._outliers.fill_(-1)

    def quantization_error(self, keys: torch.Tensor) -> torch.Tensor:
        """Mean relative squared quantization error per head of ``keys: [H, N, D]`` -> ``[H]``."""
        self._require_trained("quantization_error")
        self._check_keys("quantization_error", keys)
        assert self.centroids is not None
        return self._encode(keys, self.centroids)[1].mean(1)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Config, codebooks and codes (tensors, no copies of unused capacity)."""
        return {
            "head_dim": self.head_dim,
            "num_subspaces": self.num_subspaces,
            "bits": self.bits,
            "outlier_fraction": self.outlier_fraction,
            "centroids": self.centroids,
            "train_error": self.train_error,
            "outlier_threshold": self.outlier_threshold,
            "codes": None if self.centroids is None else self.codes.clone(),
            "outliers": None if self.centroids is None else self.outliers.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` output; the config must match this index's."""
        if not isinstance(state, dict):
            raise ConfigError(f"PQIndex.load_state_dict: state must be a dict from state_dict(), got {validate.show(state)}")
        for name in ("head_dim", "num_subspaces", "bits", "outlier_fraction"):
            if state.get(name) != getattr(self, name):
                raise ConfigError(f"PQIndex.load_state_dict: {name}={state.get(name)!r} != index {name}={getattr(self, name)}")
        centroids, codes = state.get("centroids"), state.get("codes")
        if centroids is None:
            self.centroids = self.train_error = self._codes = self.outlier_threshold = None
            self._outliers = self._outlier_counts = None
            self._outlier_capacity = 0
            self.ntotal = 0
            return
        M, K, dsub = self.num_subspaces, self.num_centroids, self.subspace_dim
        if centroids.dim() != 4 or tuple(centroids.shape[1:]) != (M, K, dsub):
            raise ShapeError(f"PQIndex.load_state_dict: centroids {tuple(centroids.shape)} != [H, {M}, {K}, {dsub}]")
        H = centroids.shape[0]
        if codes is None or codes.dtype != torch.uint8 or codes.dim() != 3 or codes.shape[0] != H or codes.shape[2] != M:
            raise ShapeError(f"PQIndex.load_state_dict: codes must be uint8 [{H}, tokens, {M}]")
        outliers = state.get("outliers")
        if (
            outliers is None or outliers.dtype != torch.int64 or outliers.dim() != 2 or outliers.shape[0] != H
            or bool((outliers >= codes.shape[1]).any()) or bool((outliers < -1).any())
        ):
            raise ShapeError(f"PQIndex.load_state_dict: outliers must be int64 [{H}, O] positions < {codes.shape[1]}, padded with -1")
        device = centroids.device
        self.centroids = centroids.float().clone()
        self.train_error = state["train_error"].clone()
        self.outlier_threshold = state["outlier_threshold"].clone()
        self._codes = torch.empty((H, max(_MIN_CAPACITY, codes.shape[1]), M), dtype=torch.uint8, device=device)
        self._outlier_capacity = outliers.shape[1]
        self._outliers = torch.full((H, outliers.shape[1] + 1), -1, dtype=torch.int64, device=device)
        self._outliers[:, : outliers.shape[1]] = outliers.to(device)
        self._outlier_counts = (outliers >= 0).sum(1).to(device)
        self._grow_outliers()
        self.ntotal = 0
        self._append_codes(codes.to(device))
