"""KVStore + PQ index: keys are encoded as they are appended, select() returns PQCache selections."""

from __future__ import annotations

import pytest
import torch

from kvstore.evict import BlockInfo
from kvstore.errors import ConfigError, OutOfRangeError, ShapeError, UnknownSequenceError
from kvstore.pq.select import SelectionConfig
from kvstore.pq.sequence import PQConfig, PQSequenceIndex
from kvstore.pq.synthetic import SyntheticConfig, SyntheticWorkload
from kvstore.spec import KVSpec
from kvstore.store import KVStore

pytestmark = pytest.mark.usefixtures("copy_streams")  # every test with immediate and with late copies

SPEC = KVSpec(num_layers=2, num_kv_heads=2, num_q_heads=8, head_dim=32, dtype=torch.float32, block_size=16)


def workload(prompt: int = 1024, steps: int = 4, seed: int = 3):
    cfg = SyntheticConfig(num_kv_heads=2, group_size=4, head_dim=32, prompt_len=prompt, num_decode=steps, num_needles=2, seed=seed)
    wl = SyntheticWorkload(cfg)
    return cfg, [wl.layer(layer) for layer in range(SPEC.num_layers)]


def test_select_matches_a_directly_built_index_and_tracks_decode_appends():
    cfg, layers = workload()
    pq = PQConfig(selection=SelectionConfig(num_sinks=4, recent_window=16))
    store = KVStore(SPEC, device_blocks=128, host_blocks=0, pq=pq)
    seq = store.create()
    keys = torch.stack([ld.keys for ld in layers])  # [L, Hkv, T, D]
    values = torch.stack([ld.values for ld in layers])
    n = cfg.prompt_len
    store.append(seq, keys[:, :, :n].transpose(1, 2), values[:, :, :n].transpose(1, 2))
    direct = PQSequenceIndex(SPEC, pq, lambda layer: keys[layer, :, :n])
    for layer in range(SPEC.num_layers):
        direct.add(layer, keys[layer, :, :n])
    q = layers[1].queries[0]
    got, want = store.select(seq, 1, q, 128), direct.select(1, q, 128)
    assert torch.equal(got.positions, want.positions) and torch.equal(got.blocks, want.blocks)
    assert got.positions.shape == (SPEC.num_kv_heads, 128)
    # A decode token is encoded on append: the recent window now ends at the new token.
    store.append(seq, keys[:, :, n : n + 1].transpose(1, 2), values[:, :, n : n + 1].transpose(1, 2))
    sel = store.select(seq, 0, layers[0].queries[1], 0.125)
    assert sel.num_tokens == n + 1 and int(sel.positions[:, -1].max()) == n
    assert torch.equal(sel.blocks, torch.unique(sel.positions // SPEC.block_size))


def test_select_many_scores_sequences_of_different_lengths():
    cfg, layers = workload(prompt=1024)
    store = KVStore(SPEC, device_blocks=256, pq=PQConfig())
    seqs = []
    for n in (600, 1000):
        s = store.create()
        k = torch.stack([ld.keys for ld in layers])[:, :, :n].transpose(1, 2)
        store.append(s, k, k)
        seqs.append(s)
    q = torch.stack([layers[0].queries[0], layers[0].queries[1]])
    sels = store.select_many(seqs, 0, q, [64, 0.0625])
    assert [sel.num_tokens for sel in sels] == [600, 1000]
    assert sels[0].positions.shape[1] == 64 and sels[1].positions.shape[1] == 63  # ceil(0.0625 * 1000)


def test_select_errors():
    plain = KVStore(SPEC, device_blocks=8)
    s = plain.create()
    with pytest.raises(ConfigError, match="no PQ index"):
        plain.select(s, 0, torch.ones(8, 32), 16)
    store = KVStore(SPEC, device_blocks=8, pq=PQConfig())
    with pytest.raises(UnknownSequenceError, match="unknown sequence 7"):
        store.select(7, 0, torch.ones(8, 32), 16)
    with pytest.raises(OutOfRangeError, match="layer 2"):
        store.select(store.create(), 2, torch.ones(8, 32), 16)
    with pytest.raises(ConfigError, match="allow_nonfinite"):
        KVStore(SPEC, device_blocks=8, pq=PQConfig(), allow_nonfinite=True)
    with pytest.raises(ConfigError, match="PQConfig"):
        KVStore(SPEC, device_blocks=8, pq={"bits": 8})


def test_refine_reads_exact_keys_wherever_the_blocks_lie():
    """Re-ranking gathers keys from device and host blocks alike: the selection is the same
    as re-ranking against the keys held in a tensor."""
    cfg, layers = workload(prompt=1024)
    pq = PQConfig(selection=SelectionConfig(num_sinks=8, recent_window=32, refine=2.0))
    store = KVStore(SPEC, device_blocks=80, host_blocks=64, pq=pq)
    seq = store.create()
    keys = torch.stack([ld.keys for ld in layers])[:, :, : cfg.prompt_len]  # [L, Hkv, n, D]
    store.append(seq, keys.transpose(1, 2), keys.transpose(1, 2) * 0.5)
    first = store.block_table(seq)[:40]
    store.offload(first).wait()  # the first 40 of 64 blocks go to the host
    assert bool((store.residency(first) == BlockInfo.TIER_HOST).all())
    direct = PQSequenceIndex(SPEC, pq, lambda layer: keys[layer])
    for layer in range(SPEC.num_layers):
        direct.add(layer, keys[layer])
    for step in range(2):
        q = layers[1].queries[step]
        got, want = store.select(seq, 1, q, 96), direct.select(1, q, 96)
        assert torch.equal(got.positions, want.positions)
    assert bool((store.residency(first) == BlockInfo.TIER_HOST).all())  # reading keys moved nothing


def test_gather_keys_rejects_bad_positions_and_layers():
    cfg, layers = workload(prompt=256)
    store = KVStore(SPEC, device_blocks=32, pq=PQConfig())
    seq = store.create()
    keys = torch.stack([ld.keys for ld in layers])[:, :, : cfg.prompt_len]
    store.append(seq, keys.transpose(1, 2), keys.transpose(1, 2))
    good = torch.tensor([[0, 5, 255], [1, 2, 3]])
    torch.testing.assert_close(store.gather_keys(seq, 1, good), keys[1].gather(1, good[..., None].expand(-1, -1, 32)))
    for bad in (torch.tensor([[0, 256, 1], [1, 2, 3]]), torch.tensor([[-2, 0, 1], [1, 2, 3]])):  # -1 is "no row"
        with pytest.raises(OutOfRangeError, match="from 256 to 256|from -2 to -2"):
            store.gather_keys(seq, 0, bad)
    with pytest.raises(ShapeError, match="positions"):
        store.gather_keys(seq, 0, torch.tensor([0, 1, 2]))
    with pytest.raises(OutOfRangeError):
        store.gather_keys(seq, 2, good)
    with pytest.raises(UnknownSequenceError):
        store.gather_keys(seq + 1, 0, good)


@pytest.mark.parametrize("layout", ["device", "host", "mixed", "dropped"])
def test_gather_keys_equals_the_keys_wherever_the_blocks_lie(layout):
    """One tier, two tiers, and dropped blocks (recomputed on read) all give the exact keys, in order."""
    cfg, layers = workload(prompt=512)
    keys = torch.stack([ld.keys for ld in layers])[:, :, : cfg.prompt_len]  # [L, Hkv, n, D]
    kv = torch.stack([keys, keys * 0.5], 1).transpose(2, 3)  # [L, 2, n, Hkv, D]
    store = KVStore(SPEC, device_blocks=32, host_blocks=32, recompute=lambda s, start, n: kv[:, :, start : start + n])
    seq = store.create()
    store.append(seq, kv[:, 0], kv[:, 1])
    ids = store.block_table(seq)
    if layout != "device":
        store.offload(ids if layout == "host" else ids[::2]).wait()
    if layout == "dropped":
        store.drop(ids[1:8:2])  # device blocks 1, 3, 5, 7 are recomputed when read
        assert bool((store.residency(ids[1:8:2]) == BlockInfo.TIER_NONE).all())
    tiers = set(store.residency(ids).tolist())
    assert tiers == {"device": {0}, "host": {1}, "mixed": {0, 1}, "dropped": {0, 1, 3}}[layout]
    g = torch.Generator().manual_seed(5)
    positions = torch.stack([torch.randperm(cfg.prompt_len, generator=g)[:300] for _ in range(SPEC.num_kv_heads)])
    want = keys[1].gather(1, positions[..., None].expand(-1, -1, SPEC.head_dim))
    assert torch.equal(store.gather_keys(seq, 1, positions), want)
