"""PQSequenceIndex: the PQ state of one sequence, one PQIndex per layer, for KVStore.

The store owns K/V in blocks; this object owns what selection needs beside them:

* **Training.** A layer's index is trained once the sequence has ``min_train_tokens`` tokens
  (at prefill, usually): on the keys just added when they are all the layer has, otherwise
  on ``key_source(layer)``. Before that, ``select`` falls back to sinks + recent tokens.
* **Appends.** Every ``add(layer, keys)`` (prefill chunk or decode token) encodes the keys
  against the current codebooks and appends their codes.
* **Drift.** The relative quantization error of new keys is tracked per head as an
  exponential moving average over ``drift.window`` tokens; when it exceeds
  ``drift.threshold`` x the error the codebooks had on their training keys (any head), or
  when ``drift.every`` tokens were appended since the last training, the layer is re-trained
  on ``key_source(layer)`` and every token is re-encoded (at most once per
  ``drift.min_interval`` tokens).
* **Where codes live.** Device-resident, on the device of the keys: codes are
  ``num_subspaces`` bytes per token per KV head per layer (4 B at M=4: 1 KiB per token for
  Llama-3-8B's 32 layers x 8 heads, 1/128 of its fp16 KV), so they never move with blocks;
  selection reads them where the queries are.

Syncs. ``add`` and ``select`` never wait for the device but while training (k-means, at
prefill and on re-training). The checks that need values go through ``checks`` (a
:class:`kvstore.syncs.DeferredChecks`): NaN/Inf keys and queries, and the drift test (error
moving average above the threshold, or more outliers than the index holds); with deferred
checks they are read at the store's ``end_step`` (one sync for everything), and a layer found
drifting is re-trained then.

KVStore integration (the calls are thin): create one per sequence with
``key_source=lambda layer: <all keys of the sequence for layer, [Hkv, n, D]>``; call
``add(layer, k)`` after writing a token's K (``k: [Hkv, n, D]``) into its block, so
``key_source`` already includes it; ``select(layer, q, budget)`` returns positions and blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Sequence

import torch

from kvstore import validate
from kvstore.errors import ConfigError, NonFiniteError, OutOfRangeError, ShapeError
from kvstore.pq.index import PQIndex
from kvstore.pq.kmeans import KMeansConfig
from kvstore.pq.select import Budget, Selection, SelectionConfig, gather_keys, select_tokens, window_selection
from kvstore.spec import KVSpec
from kvstore.syncs import DeferredChecks

__all__ = ["DriftConfig", "PQConfig", "PQSequenceIndex", "select_batch"]


@dataclass(frozen=True, kw_only=True)
class DriftConfig:
    """When a layer's codebooks are re-trained during generation.

    Attributes:
        threshold: re-train when the moving-average relative quantization error of new keys
            exceeds ``threshold`` x the training error on any head (``None``: never).
        window: tokens the moving average spans (its decay is ``1 - 1/window`` per token).
        every: also re-train every ``every`` appended tokens (``None``: no schedule).
        min_interval: tokens appended between two trainings at least.
    """

    threshold: float | None = 1.5
    window: int = 128
    every: int | None = None
    min_interval: int = 256

    def __post_init__(self) -> None:
        if self.threshold is not None and not (isinstance(self.threshold, (int, float)) and self.threshold > 1.0):
            raise ConfigError(f"DriftConfig.threshold must be None or a number > 1, got {self.threshold!r}")
        for name in ("window", "min_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"DriftConfig.{name} must be an int >= 1, got {value!r}")
        if self.every is not None and (not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1):
            raise ConfigError(f"DriftConfig.every must be None or an int >= 1, got {self.every!r}")


@dataclass(frozen=True, kw_only=True)
class PQConfig:
    """Everything PQ selection needs for a sequence.

    Attributes:
        num_subspaces, bits: code layout (M bytes per token per head, 2**bits centroids).
        outlier_fraction: share of keys recorded as outliers (see PQIndex); selection with
            ``selection.refine > 1`` always re-scores them exactly.
        kmeans: codebook training.
        selection: sinks, window and GQA aggregation.
        drift: re-training policy.
        min_train_tokens: tokens before the first training (default and minimum ``2**bits``).
    """

    num_subspaces: int = 4
    bits: int = 8
    outlier_fraction: float = 0.01
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    min_train_tokens: int | None = None

    def __post_init__(self) -> None:
        for name, lo, hi in (("num_subspaces", 1, None), ("bits", 4, 8)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
                raise ConfigError(f"PQConfig.{name} must be an int in [{lo}, {hi or 'inf'}], got {value!r}")
        f = self.outlier_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f < 1.0:
            raise ConfigError(f"PQConfig.outlier_fraction must be a number in [0, 1), got {f!r}")
        if self.min_train_tokens is not None and (
            not isinstance(self.min_train_tokens, int) or self.min_train_tokens < (1 << self.bits)
        ):
            raise ConfigError(f"PQConfig.min_train_tokens must be None or an int >= 2**bits={1 << self.bits}, got {self.min_train_tokens!r}")

    def make_index(self, head_dim: int) -> PQIndex:
        """An untrained PQIndex with this configuration."""
        return PQIndex(head_dim, self.num_subspaces, self.bits, kmeans=self.kmeans, outlier_fraction=self.outlier_fraction)

    @property
    def train_after(self) -> int:
        return self.min_train_tokens if self.min_train_tokens is not None else 1 << self.bits


class PQSequenceIndex:
    """Per-layer PQ indexes of one sequence (see the module docstring).

    Args:
        spec: model shape (layers, KV/query heads, head_dim, block_size).
        config: PQ configuration.
        key_source: ``key_source(layer) -> [Hkv, n, D]``, all keys of the sequence for a layer
            (including those being added); called to train late and to re-train.
        key_gather: ``key_gather(layer, positions: [Hkv, C]) -> [Hkv, C, D]``, the exact keys
            that re-ranking reads (``selection.refine > 1``; -1 marks no candidate); default:
            gathered from ``key_source(layer)``.
        checks: where value checks go (default: run at once).
    """

    def __init__(
        self, spec: KVSpec, config: PQConfig, key_source: Callable[[int], torch.Tensor],
        key_gather: Callable[[int, torch.Tensor], torch.Tensor] | None = None, *, checks: DeferredChecks | None = None,
    ) -> None:
        if spec.head_dim % config.num_subspaces:
            raise ConfigError(f"PQSequenceIndex: head_dim={spec.head_dim} is not a multiple of num_subspaces={config.num_subspaces}")
        self.spec = spec
        self.config = config
        self.key_source = key_source
        self.key_gather = key_gather or (lambda layer, positions: gather_keys(self.key_source(layer), positions))
        self.checks = checks if checks is not None else DeferredChecks(immediate=True)
        L = spec.num_layers
        self.indexes = [config.make_index(spec.head_dim) for _ in range(L)]
        self.num_tokens = [0] * L
        self.trainings = [0] * L  # trainings per layer (the first one included)
        self._since_train = [0] * L
        self._ema: list[torch.Tensor | None] = [None] * L  # [Hkv] moving-average relative error of new keys

    def _check_layer(self, op: str, layer: int) -> int:
        return validate.integer(layer, f"PQSequenceIndex.{op}: layer", lo=0, hi=self.spec.num_layers, error=OutOfRangeError)

    def add(self, layer: int, keys: torch.Tensor) -> None:
        """Encode and append ``keys: [Hkv, n, D]`` of ``layer``; train or re-train when due."""
        layer = self._check_layer("add", layer)
        Hkv, D = self.spec.num_kv_heads, self.spec.head_dim
        if not isinstance(keys, torch.Tensor) or keys.dim() != 3 or keys.shape[0] != Hkv or keys.shape[2] != D:
            shape = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
            raise ShapeError(f"PQSequenceIndex.add: expected keys [{Hkv}, tokens, {D}], got {shape}")
        self.checks.add((~torch.isfinite(keys)).sum(), partial(_nonfinite, f"PQSequenceIndex.add: layer {layer} keys"))
        index = self.indexes[layer]
        n = keys.shape[1]
        if not index.is_trained:
            if self.num_tokens[layer] + n >= self.config.train_after:
                self._train(layer, keys if self.num_tokens[layer] == 0 else self.key_source(layer))
            else:
                self.num_tokens[layer] += n
            return
        err = index.add(keys, check_finite=False).mean(1)  # [Hkv]
        self.num_tokens[layer] += n
        self._since_train[layer] += n
        decay = (1.0 - 1.0 / self.config.drift.window) ** n
        ema = self._ema[layer]
        self._ema[layer] = err if ema is None else decay * ema + (1.0 - decay) * err
        drift = self.config.drift
        since = self._since_train[layer]
        if since < drift.min_interval:
            return
        if drift.every is not None and since >= drift.every:
            self._train(layer, self.key_source(layer))
        elif drift.threshold is not None:
            train_error = index.train_error
            assert train_error is not None and self._ema[layer] is not None
            drifting = (self._ema[layer] > drift.threshold * train_error).any() | index.outliers_overflowed
            self.checks.add(drifting, partial(self._retrain_if, layer, self.trainings[layer]))

    def _retrain_if(self, layer: int, generation: int, drifting) -> None:
        """Re-train ``layer`` if ``drifting`` was read as set for its training ``generation``."""
        if drifting[0] and self.trainings[layer] == generation:
            self._train(layer, self.key_source(layer))

    def _train(self, layer: int, keys: torch.Tensor) -> None:
        """(Re-)train ``layer`` on all its keys ``[Hkv, n, D]`` and re-encode them."""
        index = self.config.make_index(self.spec.head_dim)
        index.train(keys)
        index.add(keys)
        self.indexes[layer] = index
        self.num_tokens[layer] = keys.shape[1]
        self.trainings[layer] += 1
        self._since_train[layer] = 0
        self._ema[layer] = None

    def drift_ratio(self, layer: int) -> torch.Tensor | None:
        """``[Hkv]`` moving-average error of new keys / training error (None before any new key)."""
        layer = self._check_layer("drift_ratio", layer)
        ema, train_error = self._ema[layer], self.indexes[layer].train_error
        return None if ema is None or train_error is None else ema / train_error

    def select(self, layer: int, queries: torch.Tensor, budget: Budget) -> Selection:
        """Tokens of ``layer`` that ``queries: [Hq, D]`` should attend to within ``budget``."""
        return select_batch([self], layer, [queries], [budget])[0]


def select_batch(seqs: Sequence[PQSequenceIndex], layer: int, queries: Sequence[torch.Tensor] | torch.Tensor, budgets: Sequence[Budget]) -> list[Selection]:
    """Selections of ``layer`` for several sequences (``queries: [B, Hq, D]``), scored in one batch.

    Sequences not trained yet get ``window_selection``. Every input is checked first, trained
    or not: the layer, each query's shape (exactly ``[spec.num_q_heads, spec.head_dim]``,
    floating point, all on one device) and each budget (an integer >= 1 or a fraction in (0, 1]).
    """
    if not isinstance(queries, (torch.Tensor, list, tuple)) or not isinstance(budgets, (list, tuple)):
        raise ShapeError(f"select_batch: queries must be a tensor or a list of tensors and budgets a list, got "
                         f"{validate.show(queries)} and {validate.show(budgets)}")
    if isinstance(queries, torch.Tensor) and queries.dim() != 3:
        raise ShapeError(f"select_batch: queries must be [B, Hq, D], got {tuple(queries.shape)}")
    if len(queries) != len(seqs) or len(budgets) != len(seqs):
        raise ShapeError(f"select_batch: {len(seqs)} sequences, {len(queries)} queries, {len(budgets)} budgets")
    budgets = [_budget(b) for b in budgets]
    devices = set()
    for i, seq in enumerate(seqs):
        layer = seq._check_layer("select", layer)
        _check_query(seq.spec, queries[i], i)
        devices.add(queries[i].device)
    if len(devices) > 1:
        raise ShapeError(f"select_batch: queries on several devices {sorted(map(str, devices))}")
    if seqs and isinstance(queries, torch.Tensor):
        seqs[0].checks.add((~torch.isfinite(queries)).sum(), partial(_nonfinite, f"select: layer {layer} queries"))
    out: list[Selection | None] = [None] * len(seqs)
    trained = []
    for i, seq in enumerate(seqs):
        if seq.indexes[layer].is_trained:
            trained.append(i)
        else:
            out[i] = window_selection(
                seq.spec.num_kv_heads, seq.num_tokens[layer], budgets[i], config=seq.config.selection,
                block_size=seq.spec.block_size, device=queries[i].device,
            )
    if trained:
        first = seqs[trained[0]]
        picked = select_tokens(
            [seqs[i].indexes[layer] for i in trained], [queries[i] for i in trained], [budgets[i] for i in trained],
            config=first.config.selection, block_size=first.spec.block_size,
            keys=[lambda pos, s=seqs[i]: s.key_gather(layer, pos) for i in trained],
            check_finite=not isinstance(queries, torch.Tensor),
        )
        for i, sel in zip(trained, picked):
            out[i] = sel
    return out  # type: ignore[return-value]


def _check_query(spec: KVSpec, q: object, i: int) -> None:
    """``q`` is one sequence's decode query ``[Hq, D]`` of ``spec`` (Hq exactly, not a multiple)."""
    want = (spec.num_q_heads, spec.head_dim)
    if not isinstance(q, torch.Tensor) or tuple(q.shape) != want:
        got = tuple(q.shape) if isinstance(q, torch.Tensor) else validate.show(q)
        raise ShapeError(f"select: queries[{i}] must be a tensor {list(want)} (Hq = {spec.group_size} x {spec.num_kv_heads} KV heads, D), got {got}")
    if not q.is_floating_point():
        raise ShapeError(f"select: queries[{i}] must be floating point, got {q.dtype}")


def _budget(budget: object) -> Budget:
    """A budget as resolve_budget takes it: an int >= 1 (numpy integers too) or a float in (0, 1]."""
    what = "select: budget (an integer >= 1 or a fraction in (0, 1])"
    if validate.is_integer(budget):
        return validate.integer(budget, what, lo=1)
    return validate.number(budget, what, lo=0.0, hi=1.0, lo_open=True)


def _nonfinite(what: str, count) -> None:
    if count[0]:
        raise NonFiniteError(f"{what} contain {int(count[0])} NaN/Inf values")
