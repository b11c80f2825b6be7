"""Helpers of the connector tests: a tiny local Llama's shapes, vLLM's KV-cache config for it,
requests, KV caches in vLLM's per-layer layout, and the connector's scheduler and worker sides
built through vLLM's own factory (conftest.py's fixtures and the tests share them)."""

from __future__ import annotations

import copy

import torch

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, BLOCK = 2, 2, 32, 16
LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(NUM_LAYERS)]

def vllm_config_with(base, extra: dict):
    """``base`` with KVStoreConnector configured by ``extra`` (kv_connector_extra_config)."""
    from vllm.config import KVTransferConfig

    cfg = copy.copy(base)
    cfg.kv_transfer_config = KVTransferConfig(
        kv_connector="KVStoreConnector", kv_connector_module_path="kvstore.integrations.vllm",
        kv_role="kv_both", kv_connector_extra_config=extra,
    )
    cfg.scheduler_config = copy.copy(base.scheduler_config)
    cfg.scheduler_config.disable_hybrid_kv_cache_manager = True
    return cfg


def kv_cache_config(num_blocks: int):
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_DIM, dtype=torch.float32)
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(LAYERS, spec)])


def make_request(req_id: str, tokens: list[int], hasher, max_tokens: int = 4):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(request_id=req_id, prompt_token_ids=tokens, sampling_params=params, pooling_params=None, block_hasher=hasher)


def make_kv_caches(num_blocks: int, layout: str = "contiguous", seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-layer caches ``[num_blocks, H, N, 2 * D]``, random (never zero); ``layout`` picks the
    physical order vLLM may use: "contiguous" (LBHNC), "nhd" (LBNHC: heads inside tokens) or
    "block_outer" (BLHNC: one allocation, block-major across layers, so each layer is a
    non-contiguous view)."""
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, NUM_KV_HEADS, BLOCK, 2 * HEAD_DIM)
    if layout == "contiguous":
        return {n: torch.randn(shape, generator=g) + 0.5 for n in LAYERS}
    if layout == "nhd":
        return {n: (torch.randn((num_blocks, BLOCK, NUM_KV_HEADS, 2 * HEAD_DIM), generator=g) + 0.5).transpose(1, 2) for n in LAYERS}
    assert layout == "block_outer"
    raw = torch.randn((num_blocks, NUM_LAYERS, *shape[1:]), generator=g) + 0.5
    return {n: raw[:, i] for i, n in enumerate(LAYERS)}


def make_scheduler(base, extra: dict, num_blocks: int = 128):
    """vLLM's real Scheduler with KVStoreConnector (loaded by module path) on ``num_blocks`` GPU blocks."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager

    cfg = vllm_config_with(base, extra)
    cfg.cache_config = copy.copy(base.cache_config)
    cfg.cache_config.num_gpu_blocks = num_blocks
    return Scheduler(cfg, kv_cache_config(num_blocks), StructuredOutputManager(cfg), block_size=BLOCK)


def make_worker(base, extra: dict, num_blocks: int = 128):
    """The worker-side KVStoreConnector for the same config."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1 import KVConnectorRole

    cfg = vllm_config_with(base, extra)
    return KVConnectorFactory.create_connector(cfg, KVConnectorRole.WORKER, kv_cache_config(num_blocks))


