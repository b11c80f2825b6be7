import pytest
import torch

from kvstore.errors import ConfigError
from kvstore.spec import MODEL_COSTS, PRESETS, KVSpec, ModelCost


def test_presets_shapes_and_bytes():
    s = KVSpec.preset("llama3-8b")
    assert (s.num_layers, s.num_kv_heads, s.num_q_heads, s.head_dim, s.block_size) == (32, 8, 32, 128, 16)
    assert s.bytes_per_token == 32 * 2 * 8 * 128 * 2  # bf16
    assert s.bytes_per_block == 16 * s.bytes_per_token
    assert s.group_size == 4
    assert s.block_shape == (32, 2, 16, 8, 128)
    assert KVSpec.preset("llama3-70b").num_q_heads == 64
    assert KVSpec.preset("qwen2.5-7b").num_kv_heads == 4
    assert KVSpec.preset("tiny").dtype == torch.float32
    assert set(PRESETS) == set(MODEL_COSTS)


def test_preset_overrides_are_validated():
    assert KVSpec.preset("llama3-8b", num_layers=4).num_layers == 4
    with pytest.raises(ConfigError, match="num_layers.*-1"):
        KVSpec.preset("llama3-8b", num_layers=-1)


def test_num_blocks_is_ceil():
    s = KVSpec.preset("tiny")
    assert [s.num_blocks(n) for n in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(num_layers=0), "num_layers.*0"),
        (dict(head_dim=1.5), "head_dim.*1.5"),
        (dict(block_size=True), "block_size.*True"),
        (dict(num_q_heads=6, num_kv_heads=4), "num_q_heads=6.*num_kv_heads=4"),
        (dict(dtype=torch.int8), "dtype.*int8"),
    ],
)
def test_bad_spec_names_the_value(kwargs, pattern):
    base = dict(num_layers=2, num_kv_heads=2, num_q_heads=4, head_dim=8)
    base.update(kwargs)
    with pytest.raises(ConfigError, match=pattern):
        KVSpec(**base)


def test_spec_is_frozen_and_kw_only():
    s = KVSpec.preset("tiny")
    with pytest.raises(Exception):
        s.num_layers = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        KVSpec(2, 2, 4, 8)  # type: ignore[misc]


def test_unknown_preset():
    with pytest.raises(ConfigError, match="nope"):
        KVSpec.preset("nope")
    with pytest.raises(ConfigError, match="nope"):
        ModelCost.preset("nope")


def test_model_cost_flops():
    c = ModelCost.preset("llama3-8b")
    assert c.linear_flops_per_token == 2 * 8.03e9
    assert c.attention_flops_per_token_position == 4 * 32 * 4096
    with pytest.raises(ConfigError, match="num_params"):
        ModelCost(num_params=0, hidden_size=8, num_layers=1)
