"""The connector's configuration (``kv_connector_extra_config``) and what it derives from vLLM's config."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvstore import validate
from kvstore.errors import ConfigError
from kvstore.evict import POLICIES
from kvstore.evict.cost import CostModel
from kvstore.integrations.lmcache import ColdTierConfig
from kvstore.spec import KVSpec, ModelCost

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig


@dataclass(frozen=True, kw_only=True)
class KVStoreConnectorConfig:
    """``kv_connector_extra_config`` of :class:`KVStoreConnector`.

    Attributes:
        host_blocks: capacity of the host tier in host blocks.
        block_size: tokens per host block; a multiple of vLLM's block size (default: equal).
        policy: kvstore eviction policy of the host tier (a name in ``kvstore.evict.POLICIES``).
        pin_memory: page-lock the host tier (default: when CUDA is available).
        cold_tier: LMCache cold tier, e.g. ``{"path": "/mnt/kv", "max_gib": 64}``; off when None.
        leaves_only: evict only blocks that no cached block extends (default). vLLM loads a
            prefix only up to its first missing block, so a block whose successor is cached
            holds that whole suffix up; evicting from the leaves keeps every cached block
            reachable. False lets the policy take any unpinned block (multi-segment view).
    """

    host_blocks: int = 4096
    block_size: int | None = None
    policy: str = "asym"
    pin_memory: bool | None = None
    cold_tier: ColdTierConfig | None = None
    leaves_only: bool = True

    def __post_init__(self) -> None:
        # frozen: the checked values (numpy integers become Python ints) are set through object.__setattr__
        object.__setattr__(self, "host_blocks", validate.tier_blocks(self.host_blocks, "kv_connector_extra_config.host_blocks", lo=1))
        if self.block_size is not None:
            object.__setattr__(
                self, "block_size", validate.integer(self.block_size, "kv_connector_extra_config.block_size", lo=1, hi=2**20)
            )
        if not isinstance(self.policy, str) or self.policy not in POLICIES or POLICIES[self.policy].offline:
            online = sorted(n for n, c in POLICIES.items() if not c.offline)
            raise ConfigError(f"kv_connector_extra_config.policy={self.policy!r} is not an online kvstore policy; known: {online}")
        if not isinstance(self.leaves_only, bool):
            raise ConfigError(f"kv_connector_extra_config.leaves_only must be a bool, got {self.leaves_only!r}")
        if self.pin_memory is not None and not isinstance(self.pin_memory, bool):
            raise ConfigError(f"kv_connector_extra_config.pin_memory must be a bool, got {self.pin_memory!r}")

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> "KVStoreConnectorConfig":
        """Validate vLLM's ``kv_connector_extra_config`` dict; unknown keys are named in the error."""
        extra = validate.mapping(extra, "kv_connector_extra_config")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ConfigError(f"unknown kv_connector_extra_config key(s) {unknown}; known: {sorted(known)}")
        if extra.get("cold_tier") is not None:
            extra["cold_tier"] = ColdTierConfig.from_dict(extra["cold_tier"])
        return cls(**extra)


def _host_spec(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig", block_size: int | None) -> tuple[KVSpec, int, list[str]]:
    """The host tier's KVSpec, vLLM's block size, and the attention layer names in host order."""
    groups = [g for g in kv_cache_config.kv_cache_groups if g.enable_kv_transfer]
    if len(groups) != 1:
        raise ConfigError(f"KVStoreConnector supports models with one KV cache group, got {len(groups)}")
    spec = groups[0].kv_cache_spec
    for attr in ("num_kv_heads", "head_size", "dtype"):
        if not hasattr(spec, attr):
            raise ConfigError(f"KVStoreConnector needs an attention KV cache, got {type(spec).__name__}")
    if spec.head_size_v != spec.head_size:
        raise ConfigError(f"KVStoreConnector needs head_size == head_size_v, got {spec.head_size} and {spec.head_size_v}")
    gpu_block = spec.block_size
    host_block = gpu_block if block_size is None else block_size
    if host_block % gpu_block:
        raise ConfigError(
            f"kv_connector_extra_config.block_size={host_block} must be a multiple of vLLM's block size {gpu_block}"
        )
    hf = vllm_config.model_config.hf_text_config
    q_per_kv = max(1, getattr(hf, "num_attention_heads", 1) // max(1, getattr(hf, "num_key_value_heads", 1)))
    kv = KVSpec(
        num_layers=len(groups[0].layer_names),
        num_kv_heads=spec.num_kv_heads,
        num_q_heads=spec.num_kv_heads * q_per_kv,
        head_dim=spec.head_size,
        dtype=spec.dtype,
        block_size=host_block,
    )
    return kv, gpu_block, list(groups[0].layer_names)


def _cost_model(vllm_config: "VllmConfig", spec: KVSpec) -> CostModel:
    """Recompute FLOPs of the served model (Llama-style estimate from its HF config)."""
    hf = vllm_config.model_config.hf_text_config
    hidden = int(getattr(hf, "hidden_size", spec.num_q_heads * spec.head_dim))
    layers = int(getattr(hf, "num_hidden_layers", spec.num_layers))
    vocab = int(getattr(hf, "vocab_size", 32000))
    params = 12 * layers * hidden * hidden + 2 * vocab * hidden
    return CostModel(model=ModelCost(num_params=float(params), hidden_size=hidden, num_layers=layers))
