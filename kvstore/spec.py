"""Model shape specs: KVSpec (what the KV cache looks like) and ModelCost (what a token costs).

A block holds ``block_size`` consecutive tokens of one sequence for *every* layer, K and V:
its tensor shape is ``KVSpec.block_shape == (num_layers, 2, block_size, num_kv_heads, head_dim)``.
Keeping a block's bytes contiguous across layers makes a tier move one contiguous copy per
block; the per-layer view a kernel reads is a strided slice of the same pool.

Importing this module does not import torch (the CLI lists presets and model costs without
it): a KVSpec's dtype is checked, and :data:`PRESETS` built, on first use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvstore import validate
from kvstore.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["KVSpec", "ModelCost", "PRESETS", "MODEL_COSTS"]


#: Upper bound (exclusive) of every KVSpec/ModelCost size: a block's byte count and every
#: product of sizes stay far below 2**63 (2**31 layers x heads x head_dim x block_size would
#: already be unrepresentable on any device, so no real model comes near it).
_MAX_SIZE = 2**31


def _require_positive(obj: object, **values: int) -> None:
    """Each field a positive integer below 2**31 (numpy integers accepted, stored as int)."""
    owner = type(obj).__name__
    for name, value in values.items():
        v = validate.integer(value, f"{owner}.{name} (a positive int)", lo=1, hi=_MAX_SIZE)
        object.__setattr__(obj, name, v)  # a frozen dataclass: store the exact Python int


@dataclass(frozen=True, kw_only=True)
class KVSpec:
    """Shape of a model's KV cache and how it is cut into blocks.

    Attributes:
        num_layers: transformer layers, each with its own K and V.
        num_kv_heads: KV heads per layer (Hkv).
        num_q_heads: query heads per layer (Hq); a multiple of num_kv_heads (GQA).
        head_dim: channels per head (D).
        dtype: element type of K and V: float32, float16 or bfloat16 (None, the default: bfloat16).
        block_size: tokens per block.
    """

    num_layers: int
    num_kv_heads: int
    num_q_heads: int
    head_dim: int
    dtype: torch.dtype | None = None
    block_size: int = 16

    def __post_init__(self) -> None:
        _require_positive(
            self,
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            num_q_heads=self.num_q_heads,
            head_dim=self.head_dim,
            block_size=self.block_size,
        )
        if self.num_q_heads % self.num_kv_heads:
            raise ConfigError(
                f"KVSpec.num_q_heads={self.num_q_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        import torch

        dtypes = (torch.float32, torch.float16, torch.bfloat16)
        if self.dtype is None:
            object.__setattr__(self, "dtype", torch.bfloat16)
        if self.dtype not in dtypes:
            raise ConfigError(f"KVSpec.dtype must be one of {dtypes}, got {self.dtype!r}")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for MHA)."""
        return self.num_q_heads // self.num_kv_heads

    @property
    def itemsize(self) -> int:
        import torch

        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """``(num_layers, 2, block_size, num_kv_heads, head_dim)``: one block, K at [:, 0], V at [:, 1]."""
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def num_blocks(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens (ceil)."""
        return -(-num_tokens // self.block_size)

    def replace(self, **changes) -> "KVSpec":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides) -> "KVSpec":
        """A named model's spec, e.g. ``KVSpec.preset("llama3-8b", num_layers=4)``."""
        try:
            base = _presets()[name]
        except KeyError:
            raise ConfigError(f"unknown KVSpec preset {name!r}; known: {sorted(_presets())}") from None
        return base.replace(**overrides) if overrides else base


@dataclass(frozen=True, kw_only=True)
class ModelCost:
    """What a token costs to compute, for cost-aware eviction and TTFT estimates.

    Recomputing one token at position ``p`` (it attends to the ``p`` tokens before it) costs
    ``2 * num_params`` FLOPs in the linear layers plus ``4 * num_layers * hidden_size * p``
    FLOPs of attention (QK^T and PV, 2 FLOPs per multiply-add each).
    """

    num_params: float
    hidden_size: int
    num_layers: int

    def __post_init__(self) -> None:
        num_params = validate.number(self.num_params, "ModelCost.num_params", lo=0.0, lo_open=True)
        object.__setattr__(self, "num_params", num_params)
        _require_positive(self, hidden_size=self.hidden_size, num_layers=self.num_layers)

    @property
    def linear_flops_per_token(self) -> float:
        return 2.0 * self.num_params

    @property
    def attention_flops_per_token_position(self) -> float:
        """Attention FLOPs one token spends per earlier token it attends to."""
        return 4.0 * self.num_layers * self.hidden_size

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelCost":
        try:
            base = MODEL_COSTS[name]
        except KeyError:
            raise ConfigError(f"unknown ModelCost preset {name!r}; known: {sorted(MODEL_COSTS)}") from None
        return dataclasses.replace(base, **overrides) if overrides else base


def _presets() -> dict[str, KVSpec]:
    """:data:`PRESETS`, built (importing torch) on first use."""
    presets = globals().get("PRESETS")
    if presets is None:
        import torch

        presets = globals()["PRESETS"] = {
            "llama3-8b": KVSpec(num_layers=32, num_kv_heads=8, num_q_heads=32, head_dim=128),
            "llama3-70b": KVSpec(num_layers=80, num_kv_heads=8, num_q_heads=64, head_dim=128),
            "qwen2.5-7b": KVSpec(num_layers=28, num_kv_heads=4, num_q_heads=28, head_dim=128),
            # CPU-test scale: Llama's GQA ratio (4) and head_dim 64, two layers, fp32.
            "tiny": KVSpec(num_layers=2, num_kv_heads=2, num_q_heads=8, head_dim=64, dtype=torch.float32),
        }
    return presets


def __getattr__(name: str):
    """``PRESETS`` (name -> KVSpec) on first use: its dtypes need torch."""
    if name == "PRESETS":
        return _presets()
    raise AttributeError(f"module 'kvstore.spec' has no attribute {name!r}")


MODEL_COSTS: dict[str, ModelCost] = {
    "llama3-8b": ModelCost(num_params=8.03e9, hidden_size=4096, num_layers=32),
    "llama3-70b": ModelCost(num_params=70.6e9, hidden_size=8192, num_layers=80),
    "qwen2.5-7b": ModelCost(num_params=7.62e9, hidden_size=3584, num_layers=28),
    # 2 layers of hidden 512 with a 4x MLP and a 32K vocabulary: 2*12*512^2 + 2*32768*512.
    "tiny": ModelCost(num_params=2 * 12 * 512**2 + 2 * 32768 * 512, hidden_size=512, num_layers=2),
}
