"""Cost model: what it costs to bring an evicted block back, by recomputing or by reloading.

Recomputing the ``n`` tokens of a block that starts at token position ``p`` costs, per token
at position ``t``, ``2 * num_params`` linear-layer FLOPs plus ``4 * num_layers * hidden * t``
attention FLOPs (:class:`kvstore.spec.ModelCost`). Summed over ``t = p .. p+n-1``::

    flops(p, n) = n * 2 * num_params + 4 * num_layers * hidden * (n * p + n * (n - 1) / 2)

so a late block costs more than an early one. Reloading a block costs its bytes over the
link bandwidth plus a fixed per-transfer latency.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvstore.errors import ConfigError
from kvstore.spec import MODEL_COSTS, ModelCost

__all__ = ["CostModel"]


@dataclass(frozen=True, kw_only=True)
class CostModel:
    """Recompute FLOPs and reload seconds of blocks.

    Attributes:
        model: FLOPs per token of the model.
        reload_bandwidth: bytes/s of the link a reload crosses (default: PCIe 5.0 x16, ~50 GB/s achieved).
        reload_latency: seconds of fixed overhead per reloaded block.
        compute_throughput: FLOP/s the engine achieves when recomputing (default: ~400 TFLOP/s dense bf16
            at ~50% utilisation of an H100), used to express recompute cost in seconds.
    """

    model: ModelCost
    reload_bandwidth: float = 50e9
    reload_latency: float = 5e-6
    compute_throughput: float = 400e12

    def __post_init__(self) -> None:
        for name in ("reload_bandwidth", "compute_throughput"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"CostModel.{name} must be > 0, got {getattr(self, name)!r}")
        if not self.reload_latency >= 0:
            raise ConfigError(f"CostModel.reload_latency must be >= 0, got {self.reload_latency!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "CostModel":
        """The cost model of a KVSpec preset (``"llama3-8b"``, ``"tiny"``, ...)."""
        try:
            model = MODEL_COSTS[name]
        except KeyError:
            raise ConfigError(f"unknown CostModel preset {name!r}; known: {sorted(MODEL_COSTS)}") from None
        return cls(model=model, **overrides)

    def recompute_flops(self, position, num_tokens) -> np.ndarray:
        """FLOPs to recompute ``num_tokens`` tokens starting at token ``position`` (arrays broadcast)."""
        p = np.asarray(position, dtype=np.float64)
        n = np.asarray(num_tokens, dtype=np.float64)
        m = self.model
        return n * m.linear_flops_per_token + m.attention_flops_per_token_position * (n * p + n * (n - 1) / 2)

    def recompute_seconds(self, position, num_tokens) -> np.ndarray:
        return self.recompute_flops(position, num_tokens) / self.compute_throughput

    def reload_seconds(self, num_bytes) -> np.ndarray:
        """Seconds to reload blocks of ``num_bytes`` bytes each (array or scalar)."""
        return self.reload_latency + np.asarray(num_bytes, dtype=np.float64) / self.reload_bandwidth
