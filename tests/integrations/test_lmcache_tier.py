"""The LMCache cold tier: bit-exact round trips through a real LocalDiskBackend directory, and
host-tier victims spilled to it and read back through the connector."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lmcache")

from kvstore.errors import ConfigError, ShapeError  # noqa: E402
from kvstore.integrations.lmcache import ColdTierConfig, LMCacheColdTier  # noqa: E402
from kvstore.spec import KVSpec  # noqa: E402

SPEC = KVSpec.preset("tiny", block_size=16)


@pytest.fixture
def tier(tmp_path):
    t = LMCacheColdTier(ColdTierConfig(path=str(tmp_path), max_gib=0.05), SPEC)
    yield t
    t.close()


def test_round_trip_bit_exact(tier, tmp_path):
    g = torch.Generator().manual_seed(0)
    blocks = torch.randn((5, *SPEC.block_shape), generator=g) + 0.25
    for i in range(5):
        tier.put(1000 + i, blocks[i])
    tier.flush()
    assert len(list(tmp_path.iterdir())) == 5
    out = torch.empty(SPEC.block_shape)
    for i in range(5):
        assert tier.contains(1000 + i) and tier.get(1000 + i, out)
        assert torch.equal(out, blocks[i])
    assert not tier.get(42, out) and not tier.contains(42)


def test_bad_input(tier):
    with pytest.raises(ShapeError, match="shape"):
        tier.put(1, torch.zeros(3))
    with pytest.raises(ConfigError, match="max_gib"):
        ColdTierConfig(path="/tmp/x", max_gib=0)
    with pytest.raises(ConfigError, match="colour"):
        ColdTierConfig.from_dict({"path": "/tmp/x", "colour": 1})


def test_connector_spills_victims_and_reads_them_back(base_vllm_config, block_hasher, tmp_path):
    pytest.importorskip("vllm")
    from test_vllm_connector import Engine, _tokens

    eng = Engine(base_vllm_config, block_hasher, {"host_blocks": 4, "policy": "lru", "cold_tier": {"path": str(tmp_path)}})
    first = _tokens(70, 21)
    eng.add("a", first, max_tokens=1)
    (out_first, _, _), _ = eng.run(2)
    a_blocks = out_first.scheduled_new_reqs[0].block_ids[0][:4]
    out_a = eng.sched.connector.scheduler.index
    pages = {b: {n: eng.caches[n][b].clone() for n in eng.caches} for b in range(128)}
    eng.add("b", _tokens(70, 22), max_tokens=1)  # 4 more blocks: a's 4 spill to the cold tier
    steps = eng.run(2)
    assert sum(len(m.spills) for _, m, _ in steps) == 4 and len(out_a.cold) == 4
    eng.worker.worker.cold.flush()
    assert len(list(tmp_path.iterdir())) == 4
    eng.sched.reset_prefix_cache()
    for t in eng.caches.values():
        t.normal_()
    eng.add("c", first + [1])
    out, meta, kvo = eng.step()
    assert len(meta.fetches) == 4 and len(meta.loads["c"]) == 4 and not kvo.invalid_block_ids
    assert out.scheduled_new_reqs[0].num_computed_tokens == 64
    gpu_c = meta.loads["c"].gpu_blocks.tolist()
    for src, dst in zip(a_blocks, gpu_c):
        for n in eng.caches:
            assert torch.equal(eng.caches[n][dst], pages[src][n])


@pytest.mark.parametrize("path", ["/proc/kvstore-cold", "{file}/sub", "{file}"])
def test_a_path_the_disk_cannot_use_is_a_config_error_naming_it(tmp_path, path):
    """Refused at startup, before LMCache is set up, with the path and the reason."""
    (tmp_path / "a-file").write_text("x")
    path = path.format(file=tmp_path / "a-file")
    with pytest.raises(ConfigError, match=rf"cold_tier.path '{path}' is not a writable directory: "):
        LMCacheColdTier(ColdTierConfig(path=path, max_gib=0.05), SPEC)


def test_a_missing_directory_is_created(tmp_path):
    target = tmp_path / "new" / "cold"
    tier = LMCacheColdTier(ColdTierConfig(path=str(target), max_gib=0.05), SPEC)
    try:
        assert target.is_dir() and not any(p.name.startswith(".kvstore-write-check") for p in target.iterdir())
    finally:
        tier.close()
