"""A decode step does not wait for the device: counted on the CPU with kvstore.syncs.SyncCounter,
which records every call that would sync on CUDA (on tensors derived from the store's device
state). Deferred checks still raise, once per step, as typed errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstore.errors import NonFiniteError, OutOfRangeError
from kvstore.evict import BlockInfo
from kvstore.pq import PQConfig
from kvstore.pq.select import SelectionConfig
from kvstore.spec import KVSpec
from kvstore.store import KVStore
from kvstore.syncs import DeferredChecks, SyncCounter

SPEC = KVSpec(num_layers=3, num_kv_heads=2, num_q_heads=8, head_dim=64, dtype=torch.float32, block_size=16)
PROMPT = 512


def _kv(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SPEC.num_layers, 2, n, SPEC.num_kv_heads, SPEC.head_dim, generator=g) + 0.25


def _store(mode: str, truth: torch.Tensor) -> tuple[KVStore, int]:
    """A prefilled store in one of the decode configurations of `kvstore bench`."""
    kw: dict = {"defer_checks": True}
    if mode.startswith("pq"):
        kw["pq"] = PQConfig(selection=SelectionConfig(refine=1.0 if mode == "pq-codes" else 4.0))
    if mode == "pq-cached":  # re-ranking and final rows through the device row cache
        kw["pq"], kw["row_cache"] = PQConfig(selection=SelectionConfig(refine=4.0)), 256
    if mode == "lossless":  # a device tier of a quarter of the context, a host tier of half, the rest dropped
        kw.update(device_blocks=10, host_blocks=16, recompute=lambda s, start, n: truth[:, :, start : start + n].clone())
    else:
        kw.update(device_blocks=40, host_blocks=40)
    store = KVStore(SPEC, **kw)
    seq = store.create()
    for start in range(0, PROMPT, 128):
        store.append(seq, truth[:, 0, start : start + 128], truth[:, 1, start : start + 128])
    ids = store.block_table(seq)
    if mode.startswith("pq"):
        store.offload(ids[:24])  # most of the prompt on the host tier
    if mode == "lossless":
        store.drop(ids[4:10])
    store.end_step()
    return store, seq


def _decode(store: KVStore, seq: int, truth: torch.Tensor, step: int, q: torch.Tensor, mode: str) -> list[torch.Tensor]:
    outs = []
    t = PROMPT + step
    for layer in range(SPEC.num_layers):
        store.append(seq, truth[layer, 0, t : t + 1], truth[layer, 1, t : t + 1], layer=layer)
        sel = store.select(seq, layer, q[0], 1 / 16) if mode.startswith("pq") else None
        outs.append(store.attend(seq, layer, q, sel)[0])
    return outs


@pytest.mark.parametrize("mode", ["pq", "pq-cached", "pq-codes", "full", "lossless"])
def test_a_decode_step_makes_no_sync_and_end_step_makes_one(mode):
    truth = _kv(PROMPT + 4, seed=1)
    store, seq = _store(mode, truth)
    q = torch.randn(1, SPEC.num_q_heads, SPEC.head_dim, generator=torch.Generator().manual_seed(2))
    counter = SyncCounter("cpu")
    counter.tag_tree(store, exclude=[store.host_pool.kv])
    counter.tag(q, truth)
    with counter:
        for step in range(3):
            _decode(store, seq, truth, step, q, mode)
            assert counter.count == 0, f"step {step} of {mode} synced: {dict(counter.sites)}"
            store.end_step()
            assert counter.count == 1, f"end_step of {mode}: {dict(counter.sites)}"
            counter.reset()
    assert (store.row_cache_bytes() > 0) == (mode == "pq-cached")


def test_the_counter_sees_every_kind_of_sync():
    t = torch.arange(6.0) - 2
    host = torch.arange(6.0)
    counter = SyncCounter("cpu", tag=[t])
    with counter:
        t.sum().item()
        bool(t.any())
        int(t[0])
        t.tolist()
        t.cpu()
        t.numpy()
        torch.nonzero(t)
        torch.unique(t)
        t[t > 0]
        torch.masked_select(t, t > 0)
        n = counter.count
        host.sum().item(), host.tolist(), host[host > 0], (t + 1).cpu().numpy()  # host data: free; one more on t
    assert n == 10 and counter.count == 11


def test_deferred_checks_raise_at_end_step_naming_the_value():
    truth = _kv(PROMPT + 1, seed=3)
    store, seq = _store("pq", truth)
    bad = truth[0, :, PROMPT : PROMPT + 1].clone()
    bad[0, 0, 1, 5] = float("nan")
    store.append(seq, bad[0], bad[1], layer=0)  # no sync: not raised yet
    with pytest.raises(NonFiniteError, match="sequence 0, layer 0"):
        store.end_step()
    store.end_step()  # raised once, then clear
    positions = torch.tensor([[0, 3, PROMPT + 7], [1, 2, 3]])
    store.fetch(seq, 1, positions)
    with pytest.raises(OutOfRangeError, match=f"from {PROMPT + 7} to {PROMPT + 7}"):
        store.end_step()


def test_immediate_checks_raise_before_anything_changes():
    store = KVStore(SPEC, device_blocks=8, defer_checks=False)
    seq = store.create()
    kv = _kv(4, seed=4)
    kv[1, 0, 2, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="k appended to sequence 0"):
        store.append(seq, kv[:, 0], kv[:, 1])
    assert store.num_tokens(seq) == 0 and store.memory()["device"].blocks_used == 0


def test_attention_reads_reach_the_device_policy_at_end_step():
    """A block every step reads is not the LRU victim."""
    truth = _kv(PROMPT + 2, seed=5)
    store = KVStore(SPEC, device_blocks=PROMPT // 16, host_blocks=16, defer_checks=True)  # full after the prompt
    seq = store.create()
    store.append(seq, truth[:, 0, :PROMPT], truth[:, 1, :PROMPT])
    first = int(store.block_table(seq)[0])
    positions = torch.zeros((SPEC.num_kv_heads, 1), dtype=torch.int64)  # token 0: block 0 only
    q = truth[0, 0, :1].repeat_interleave(SPEC.group_size, 1)[:, : SPEC.num_q_heads]
    for layer in range(SPEC.num_layers):
        store.attend(seq, layer, q, positions)
    store.end_step()
    store.append(seq, truth[:, 0, PROMPT : PROMPT + 2], truth[:, 1, PROMPT : PROMPT + 2])  # needs one block: evicts
    assert store.residency([first])[0] == BlockInfo.TIER_DEVICE  # the read block survived
    assert store.residency(store.block_table(seq)[1:2])[0] == BlockInfo.TIER_HOST  # the LRU one went


def test_deferred_checks_run_every_callback_and_raise_the_first_error():
    seen = []
    checks = DeferredChecks(immediate=False)

    def fail(value):
        seen.append(int(value[0]))
        raise OutOfRangeError(f"bad {int(value[0])}")

    checks.add(torch.tensor(1), fail)
    checks.add(torch.tensor([2, 3]), lambda v: seen.append(v.tolist()))
    checks.add(torch.tensor(4), fail)
    with pytest.raises(OutOfRangeError, match="bad 1"):
        checks.flush()
    assert seen == [1, [2, 3], 4] and len(checks) == 0
    assert np.array_equal(np.array(seen[1]), [2, 3])
