"""Shared fixtures: a real vLLM 0.32 VllmConfig for a tiny local Llama (no weights, no tokenizer),
the real vLLM Scheduler with KVStoreConnector loaded through kv_connector_module_path, and
real CPU KV caches in vLLM's [num_blocks, H, N, 2 * D] per-layer layout."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")

from vllm_helpers import BLOCK, HEAD_DIM, NUM_KV_HEADS, NUM_LAYERS  # noqa: E402


@pytest.fixture(scope="session")
def base_vllm_config(tmp_path_factory):
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig

    model_dir = tmp_path_factory.mktemp("tiny-llama")
    (model_dir / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
        "intermediate_size": 256, "num_attention_heads": 8, "num_key_value_heads": NUM_KV_HEADS,
        "head_dim": HEAD_DIM, "num_hidden_layers": NUM_LAYERS, "vocab_size": 1000,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "torch_dtype": "float32",
    }))
    model = ModelConfig(model=str(model_dir), skip_tokenizer_init=True, dtype="float32", max_model_len=2048, seed=0)
    return VllmConfig(
        model_config=model,
        scheduler_config=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512, max_model_len=2048, is_encoder_decoder=False),
        cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=True),
        device_config=DeviceConfig("cpu"),
    )


@pytest.fixture(scope="session")
def block_hasher():
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

    init_none_hash(sha256)
    return get_request_block_hasher(BLOCK, sha256)


@pytest.fixture(params=["immediate", "late"])
def worker_streams(request, monkeypatch):
    """Run a test twice: with the CPU's immediate copies, and with every connector worker's copies
    on a tests/late_stream.py LateStream (a copy lands only when waited for; until then its
    destination is NaN), which turns any copy-ordering bug of the worker into a wrong value."""
    if request.param == "late":
        import kvstore.integrations.vllm.worker
        from late_stream import LateStream

        monkeypatch.setattr(kvstore.integrations.vllm.worker, "copy_stream", lambda device: LateStream())
    return request.param
