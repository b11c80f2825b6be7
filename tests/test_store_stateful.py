"""Stateful test: random create/append/offload/load/drop/fork/free sequences against a
plain-Python model of the store.

After every step: the store's invariants hold (no leaked or doubly owned slot, refcounts equal
the references from block tables, policies track exactly the resident blocks), tier byte
counts match the model's count of copies, and every token of every sequence reads back
bit-exactly, whichever tiers it passed through. Operations the store must refuse (a full
tier with nothing evictable, a load of a dropped block, ...) raise a KVStoreError and change
nothing. Each run drives both a store with a recompute callable (lossless mode: blocks get
dropped) and one without (nothing may ever be lost).

In lossless mode the recompute callable also misbehaves on purpose (it raises, returns a block
of the wrong shape or dtype, or one holding NaN) while an operation needs a dropped block
(ensure_resident, append into a dropped partial block, fork, read, attention over every token,
also after it worked for the first blocks of the call: a later chunk of a sequence longer than
the device tier): the operation must fail with that error and leave everything observable as it
was, down to the tiers and the policies' eviction order. So must an append whose device
victims come from a policy that breaks its contract (raises, names a duplicate, protected or
unknown victim): PolicyError, nothing changed. Attention over every token that works equals
dense attention over the model's K/V.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from kvstore.attn import multi_segment_attention
from kvstore.errors import KVStoreError, NonFiniteError, PolicyError, RecomputeError, ShapeError
from kvstore.evict.base import BlockInfo
from kvstore.evict.lru import LRU
from kvstore.spec import KVSpec
from kvstore.store import KVStore

pytestmark = pytest.mark.usefixtures("copy_streams")  # every test with immediate and with late copies

SPEC = KVSpec(num_layers=2, num_kv_heads=2, num_q_heads=4, head_dim=64, dtype=torch.float32, block_size=4)  # a head_dim attention takes
STEPS = {"count": 0}
FAULTS = {"count": 0, "attend": 0, "attend_chunks": 0, "policy": 0}


class Moody(LRU):
    """LRU that, while ``fault`` is set, breaks the policy contract when asked for victims: it
    raises, names a victim twice, names a protected block, or one its tier does not hold."""

    FAULTS = ("raise", "twice", "protected", "unknown")

    def __init__(self, info=None) -> None:
        super().__init__(info)
        self.fault: str | None = None

    def victims(self, n, protected=None):
        out = super().victims(n, protected)
        if self.fault is None or n == 0:
            return out
        if self.fault == "raise":
            raise EngineFailure("the policy failed")
        if self.fault == "twice" and out.size:
            return np.repeat(out[:1], 2)
        if self.fault == "protected" and protected is not None:
            ids = np.flatnonzero(protected) if protected.dtype == np.bool_ else np.asarray(protected, dtype=np.int64)
            if ids.size:
                return ids[:n]
        return np.full(n, 10**6, dtype=np.int64)  # "unknown", and "protected" with nothing protected


class EngineFailure(Exception):
    """What a failing engine's recompute raises (not a KVStoreError: the store raises it as a
    RecomputeError, with this as its cause)."""


#: fault -> (what the misbehaving recompute returns for the true block ``kv``, the error the store raises)
FAULTY = {
    "raise": (None, RecomputeError),
    "long": (lambda kv: torch.cat([kv, kv[:, :, :1]], 2), ShapeError),
    "heads": (lambda kv: kv[:, :, :, :1], ShapeError),
    "dtype": (lambda kv: kv.double(), ShapeError),
    "list": (lambda kv: kv.tolist(), ShapeError),
    "nan": (lambda kv: kv.index_fill(2, torch.tensor([kv.shape[2] - 1]), float("nan")), NonFiniteError),
}


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.truth: dict[int, torch.Tensor] = {}  # seq -> [L, 2, n, Hkv, D], the model
        self.rng = torch.Generator().manual_seed(0)
        self.fault: str | None = None
        self.spare = 0  # calls that still work while a fault is set

    def _recompute(self, seq: int, start: int, n: int) -> torch.Tensor:
        kv = self.truth[seq][:, :, start : start + n].clone()
        if self.fault is None:
            return kv
        if self.spare > 0:
            self.spare -= 1
            return kv
        if self.fault == "raise":
            raise EngineFailure(f"recompute({seq}, {start}, {n}) failed")
        return FAULTY[self.fault][0](kv)

    @initialize(
        lossless=st.booleans(),
        device_blocks=st.integers(2, 8),
        host_blocks=st.integers(0, 8),
        seed=st.integers(0, 2**16),
    )
    def setup(self, lossless: bool, device_blocks: int, host_blocks: int, seed: int) -> None:
        self.rng.manual_seed(seed)
        self.store = KVStore(
            SPEC,
            device_blocks=device_blocks,
            host_blocks=host_blocks,
            recompute=self._recompute if lossless else None,
            device_policy=Moody(),
            device="cpu",  # the model's tensors are CPU tensors; checks run at once (a NaN fault raises in the call)
        )
        for _ in range(2):
            s = self.store.create()
            self.truth[s] = self._kv(0)

    # ------------------------------------------------------------------ helpers
    def _kv(self, n: int) -> torch.Tensor:
        return torch.randn(SPEC.num_layers, 2, n, SPEC.num_kv_heads, SPEC.head_dim, generator=self.rng) + 0.5

    def _attempt(self, fn) -> bool:
        """Run ``fn``; a KVStoreError must leave the store unchanged. Returns True on success."""
        before = self._observable()
        try:
            fn()
        except KVStoreError:
            assert self._observable() == before, "a refused operation changed the store"
            return False
        return True

    def _observable(self):
        st_ = self.store
        b = st_.blocks
        tables = {s: st_.block_table(s).tolist() for s in st_.sequences}
        return (
            tables,
            {s: [st_.num_tokens(s, layer) for layer in range(SPEC.num_layers)] for s in st_.sequences},
            b.dev_slot[: st_._next_id].tolist(),
            b.host_slot[: st_._next_id].tolist(),
            b.tier[: st_._next_id].tolist(),
            b.filled[: st_._next_id].tolist(),
            st_.device_pool._free[: st_.device_pool.num_free].tolist(),
            st_.host_pool._free[: st_.host_pool.num_free].tolist(),
            [p.victims(len(p)).tolist() for p in (st_.device_policy, st_.host_policy)],  # eviction order
            st_.memory(),
        )

    def _dropped(self) -> np.ndarray:
        ids = self._all_blocks()
        return ids[self.store.blocks.tier[ids] == BlockInfo.TIER_NONE] if ids.size else ids

    def _fails(self, fault: str, fn) -> None:
        """``fn`` needs a dropped block while recompute misbehaves as ``fault``: it raises that
        fault's error and changes nothing observable (the invariants then read every token)."""
        before = self._observable()
        self.fault = fault
        try:
            with pytest.raises(FAULTY[fault][1]):
                fn()
        finally:
            self.fault, self.spare = None, 0
        assert self._observable() == before, f"a recompute fault ({fault}) changed the store"
        FAULTS["count"] += 1

    def _all_blocks(self) -> np.ndarray:
        ids = [self.store.block_table(s).numpy() for s in self.store.sequences]
        return np.unique(np.concatenate(ids)) if ids else np.empty(0, dtype=np.int64)

    def _pick(self, data, where) -> np.ndarray:
        ids = self._all_blocks()
        ids = ids[where(ids)] if ids.size else ids
        if not ids.size:
            return ids
        chosen = data.draw(st.sets(st.integers(0, ids.size - 1), min_size=1, max_size=ids.size))
        return ids[sorted(chosen)]

    # ------------------------------------------------------------------ rules
    @rule()
    def create(self) -> None:
        if len(self.store.sequences) < 4:
            s = self.store.create()
            self.truth[s] = self._kv(0)

    @precondition(lambda self: self.truth)
    @rule(data=st.data(), n=st.integers(1, 9))
    def append(self, data, n: int) -> None:
        s = data.draw(st.sampled_from(sorted(self.truth)))
        kv = self._kv(n)
        if self._attempt(lambda: self.store.append(s, kv[:, 0], kv[:, 1])):
            self.truth[s] = torch.cat([self.truth[s], kv], dim=2)

    @precondition(lambda self: self.truth)
    @rule(data=st.data())
    def decode_step_layer_by_layer(self, data) -> None:
        s = data.draw(st.sampled_from(sorted(self.truth)))
        kv = self._kv(1)
        for layer in range(SPEC.num_layers):
            if not self._attempt(lambda: self.store.append(s, kv[layer, 0], kv[layer, 1], layer=layer)):
                # A later layer was refused: finish the step with capacity guaranteed by
                # the block the earlier layers already allocated, or undo nothing (the
                # earlier layers' writes sit in that block; they must read back too).
                assert layer == 0, "only the first layer of a step can need a new block"
                return
        self.truth[s] = torch.cat([self.truth[s], kv], dim=2)

    @rule(data=st.data())
    def offload(self, data) -> None:
        ids = self._pick(data, lambda ids: self.store.blocks.dev_slot[ids] >= 0)
        if ids.size:
            self._attempt(lambda: self.store.offload(ids))

    @rule(data=st.data())
    def load(self, data) -> None:
        ids = self._pick(data, lambda ids: self.store.blocks.dev_slot[ids] < 0)
        if ids.size:
            ok = self._attempt(lambda: self.store.load(ids))
            if ok:
                assert np.all(self.store.blocks.dev_slot[ids] >= 0)

    @rule(data=st.data())
    def offload_then_load(self, data) -> None:
        """Evict blocks and bring them straight back, with no host read in between (copies in flight)."""
        ids = self._pick(data, lambda ids: self.store.blocks.dev_slot[ids] >= 0)
        if ids.size and self._attempt(lambda: self.store.offload(ids)):
            self._attempt(lambda: self.store.load(ids[::-1]))

    @rule(data=st.data())
    def drop(self, data) -> None:
        ids = self._pick(data, lambda ids: ids >= 0)
        if ids.size:
            ok = self._attempt(lambda: self.store.drop(ids))
            assert ok == (self.store.recompute is not None)

    @rule(data=st.data())
    def ensure_resident(self, data) -> None:
        ids = self._pick(data, lambda ids: ids >= 0)
        if ids.size:
            self._attempt(lambda: self.store.ensure_resident(ids))

    @precondition(lambda self: hasattr(self, "store") and self.store.recompute is not None)
    @rule(data=st.data(), fault=st.sampled_from(sorted(FAULTY)))
    def ensure_resident_while_recompute_fails(self, data, fault: str) -> None:
        ids = self._pick(data, lambda ids: ids >= 0)
        if not ids.size:
            return
        if not self._dropped().size:  # drop one of them first (a refused drop is no drop)
            self.store.drop(ids[:1])
        ids = np.union1d(ids, self._dropped()[:1])
        self._fails(fault, lambda: self.store.ensure_resident(ids))

    @precondition(lambda self: hasattr(self, "store") and self.store.recompute is not None)
    @rule(data=st.data(), fault=st.sampled_from(sorted(FAULTY)), n=st.integers(1, 6))
    def append_fork_read_while_recompute_fails(self, data, fault: str, n: int) -> None:
        """A sequence whose last block is partial, dropped first: appending writes into it,
        forking copies it, reading it recomputes it; each needs recompute."""
        st_ = self.store
        seqs = [s for s in sorted(self.truth) if self.truth[s].shape[2] % SPEC.block_size]
        if not seqs:
            return
        s = data.draw(st.sampled_from(seqs))
        st_.drop(st_.block_table(s)[-1:])
        kv = self._kv(n)
        op = data.draw(st.sampled_from(["append", "append_layer", "fork", "read"]))
        calls = {
            "append": lambda: st_.append(s, kv[:, 0], kv[:, 1]),
            "append_layer": lambda: st_.append(s, kv[0, 0], kv[0, 1], layer=0),
            "fork": lambda: st_.fork(s),
            "read": lambda: st_.read(s),
        }
        self._fails(fault, calls[op])

    @precondition(lambda self: self.truth)
    @rule(data=st.data(), fault=st.sampled_from(Moody.FAULTS), n=st.integers(1, 9))
    def append_while_the_policy_misbehaves(self, data, fault: str, n: int) -> None:
        """An append that needs device victims from a policy breaking its contract raises
        PolicyError before anything changes; one that needs none goes through."""
        s = data.draw(st.sampled_from(sorted(self.truth)))
        kv = self._kv(n)
        policy, before = self.store.device_policy, self._observable()
        policy.fault = fault
        try:
            self.store.append(s, kv[:, 0], kv[:, 1])
        except KVStoreError as e:
            policy.fault = None
            assert self._observable() == before, f"a misbehaving policy ({fault}) changed the store"
            if isinstance(e, PolicyError):
                FAULTS["policy"] += 1
            return
        finally:
            policy.fault = None
        self.truth[s] = torch.cat([self.truth[s], kv], dim=2)

    def _queries(self, tq: int) -> torch.Tensor:
        return torch.randn(tq, SPEC.num_q_heads, SPEC.head_dim, generator=self.rng)

    @precondition(lambda self: any(kv.shape[2] for kv in self.truth.values()))
    @rule(data=st.data(), layer=st.integers(0, SPEC.num_layers - 1), tq=st.integers(1, 3))
    def attend_every_token(self, data, layer: int, tq: int) -> None:
        s = data.draw(st.sampled_from([s for s in sorted(self.truth) if self.truth[s].shape[2]]))
        kv = self.truth[s][layer]
        q = self._queries(min(tq, kv.shape[1]))
        result = []
        if self._attempt(lambda: result.append(self.store.attend(s, layer, q))):
            ref, ref_lse = multi_segment_attention(q, [(kv[0], kv[1])], causal_last=True)
            torch.testing.assert_close(result[0][0], ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(result[0][1], ref_lse, rtol=1e-5, atol=1e-5)

    @precondition(lambda self: hasattr(self, "store") and self.store.recompute is not None and any(kv.shape[2] for kv in self.truth.values()))
    @rule(data=st.data(), fault=st.sampled_from(sorted(FAULTY)), layer=st.integers(0, SPEC.num_layers - 1))
    def attend_every_token_while_recompute_fails(self, data, fault: str, layer: int) -> None:
        """Some of the sequence's blocks dropped first; the callable works for the first
        ``spare`` of them (a later chunk fails when the sequence outgrows the device tier)."""
        st_ = self.store
        s = data.draw(st.sampled_from([s for s in sorted(self.truth) if self.truth[s].shape[2]]))
        grow = st_.device_pool.num_slots * SPEC.block_size + 1 - self.truth[s].shape[2]
        if grow > 0 and data.draw(st.booleans()):  # longer than the device tier: several chunks
            kv = self._kv(grow)
            if self._attempt(lambda: st_.append(s, kv[:, 0], kv[:, 1])):
                self.truth[s] = torch.cat([self.truth[s], kv], dim=2)
        table = st_.block_table(s).numpy()
        st_.drop(table[sorted(data.draw(st.sets(st.integers(0, table.size - 1), min_size=1)))])
        dropped = int((st_.residency(table) == BlockInfo.TIER_NONE).sum())
        spare = data.draw(st.integers(0, dropped - 1))
        q = self._queries(1)
        self._fails(fault, lambda: (setattr(self, "spare", spare), st_.attend(s, layer, q)))
        FAULTS["attend"] += 1
        FAULTS["attend_chunks"] += int(table.size > st_.device_pool.num_slots)

    @precondition(lambda self: self.truth)
    @rule(data=st.data())
    def fork(self, data) -> None:
        if len(self.store.sequences) >= 4:
            return
        s = data.draw(st.sampled_from(sorted(self.truth)))
        result = []
        if self._attempt(lambda: result.append(self.store.fork(s))):
            self.truth[result[0]] = self.truth[s].clone()

    @precondition(lambda self: self.truth)
    @rule(data=st.data())
    def free(self, data) -> None:
        s = data.draw(st.sampled_from(sorted(self.truth)))
        self.store.free(s)
        del self.truth[s]

    # ------------------------------------------------------------------ invariants
    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "store"):
            return
        STEPS["count"] += 1
        st_ = self.store
        st_.check()
        b = st_.blocks
        live = self._all_blocks()
        mem = st_.memory()
        assert mem["device"].bytes_used == int((b.dev_slot[live] >= 0).sum()) * SPEC.bytes_per_block
        assert mem["host"].bytes_used == int((b.host_slot[live] >= 0).sum()) * SPEC.bytes_per_block
        for s, kv in self.truth.items():
            assert st_.num_tokens(s) == kv.shape[2]
            if kv.shape[2]:
                k, v = st_.read(s)
                assert torch.equal(k, kv[:, 0]) and torch.equal(v, kv[:, 1]), f"sequence {s} read back wrong"


def test_store_state_machine():
    STEPS["count"] = 0
    FAULTS.update(count=0, attend=0, attend_chunks=0, policy=0)
    run_state_machine_as_test(
        StoreMachine,
        settings=settings(
            max_examples=150,
            stateful_step_count=40,
            deadline=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    assert STEPS["count"] >= 2000, f"only {STEPS['count']} steps ran"
    assert FAULTS["count"] >= 50, f"only {FAULTS['count']} operations ran into a failing recompute"
    assert FAULTS["policy"] >= 20, f"only {FAULTS['policy']} appends met a misbehaving policy"
    assert FAULTS["attend_chunks"] >= 5, f"only {FAULTS} attention calls (over several chunks) ran into one"
