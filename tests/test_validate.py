"""Bad input at the public API: a typed error naming the value, and a store left as it was.

Hypothesis draws bad values (floats, bools, numpy integers of every width out of range, huge
and negative ints, strings, None, lists, arrays and tensors of the wrong dtype or with values
out of range) and feeds them to each entry point of KVStore, the PQ index and the trace
loader. Each call must raise a KVStoreError whose message names the value (as
:func:`kvstore.validate.show` writes it), and the store's full state (tables, slots, tiers,
free lists, the policies' eviction order and the bytes of both pools) must be unchanged. The
same values in range as numpy integers must behave exactly as Python ints.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from store_helpers import random_kv
from kvstore import validate
from kvstore.blocks import BlockPool
from kvstore.errors import ConfigError, KVStoreError, NonFiniteError, OutOfRangeError, RecomputeError, ShapeError, TraceFormatError
from kvstore.evict.base import BlockInfo
from kvstore.evict.trace import Trace, load_trace
from kvstore.pq.index import PQIndex
from kvstore.pq.sequence import PQConfig
from kvstore.spec import KVSpec, ModelCost
from kvstore.store import KVStore

SPEC = KVSpec(num_layers=2, num_kv_heads=2, num_q_heads=4, head_dim=8, dtype=torch.float32, block_size=4)
CPU = "cpu"  # every tensor here is a CPU tensor, and checks run at once (deferred ones would raise at end_step)
PROPERTY = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

NUMPY_INTS = (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)
TORCH_INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


# ------------------------------------------------------------------ the world the calls run against
class Recompute:
    """The engine's recompute callable; ``fault`` makes it return a block with a NaN, an Inf,
    or one that requires grad."""

    def __init__(self) -> None:
        self.kv: dict[int, torch.Tensor] = {}
        self.fault: str | None = None

    def __call__(self, seq: int, start: int, n: int) -> torch.Tensor:
        kv = self.kv[seq][:, :, start : start + n].clone()
        if self.fault == "raise":
            raise RuntimeError("the engine failed")
        if self.fault == "grad":
            kv.requires_grad_()
        elif self.fault is not None:
            kv[0, 1, n - 1, 0, 0] = float(self.fault)
        return kv


@functools.lru_cache(maxsize=None)
def world():
    """A store with blocks on every tier (device, host only, dropped) and a PQ store with one
    trained and one untrained sequence. Built once: every call against it must fail."""
    truth = Recompute()
    store = KVStore(SPEC, device_blocks=6, host_blocks=4, recompute=truth, device=CPU)
    seqs = []
    for seed, n in ((1, 10), (2, 5)):
        s = store.create()
        truth.kv[s] = random_kv(SPEC, n, seed)
        store.append(s, truth.kv[s][:, 0], truth.kv[s][:, 1])
        seqs.append(s)
    table = store.block_table(seqs[0])
    store.offload(table[:1])
    store.drop(table[1:2])
    pq_store = KVStore(SPEC, device_blocks=32, pq=PQConfig(bits=4), device=CPU)
    trained, untrained = pq_store.create(), pq_store.create()
    pq_store.append(trained, *random_kv(SPEC, 40, 3).unbind(1))
    pq_store.append(untrained, *random_kv(SPEC, 6, 4).unbind(1))
    assert pq_store._pq[trained].indexes[0].is_trained and not pq_store._pq[untrained].indexes[0].is_trained
    return store, seqs, pq_store, trained, untrained


def snapshot(store: KVStore):
    """Everything a call could change, read without touching anything (no access, no copy)."""
    b = store.blocks
    n = store._next_id
    return (
        {s: (store._seqs[s].ids.tolist(), store._seqs[s].layer_lens.tolist()) for s in store.sequences},
        [getattr(b, name)[:n].tolist() for name in ("dev_slot", "host_slot", "tier", "filled", "refcount", "last_access", "access_count")],
        [pool._free[: pool.num_free].tolist() for pool in (store.device_pool, store.host_pool)],
        [p.victims(len(p)).tolist() for p in (store.device_policy, store.host_policy)],
        store._free_ids.tolist(),
        {s: (list(pq.num_tokens), list(pq.trainings)) for s, pq in store._pq.items()},
        store._clock,
    ), [pool.kv.clone() for pool in (store.device_pool, store.host_pool)]


def assert_unchanged(store: KVStore, before) -> None:
    meta, pools = snapshot(store)
    assert meta == before[0], "a refused call changed the store's bookkeeping"
    for a, b in zip(pools, before[1]):  # bitwise: unused slots may hold NaN
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), "a refused call wrote into a pool"
    store.check()


def refused(store: KVStore, call, named: str, error=KVStoreError) -> KVStoreError:
    """``call()`` raises ``error`` (a KVStoreError) whose message contains ``named``; the store is unchanged."""
    before = snapshot(store)
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, KVStoreError), f"{type(info.value).__name__} is not a KVStoreError: {info.value}"
    assert named in str(info.value), f"the message {str(info.value)!r} does not name {named!r}"
    assert_unchanged(store, before)
    return info.value


# ------------------------------------------------------------------ bad values
def numpy_int_outside(lo: int, hi: int):
    """A numpy integer of any width whose value is outside ``[lo, hi)``."""
    def of(dtype):
        info = np.iinfo(dtype)
        below = st.integers(int(info.min), lo - 1) if info.min < lo else st.nothing()
        above = st.integers(hi, int(info.max)) if info.max >= hi else st.nothing()
        return st.one_of(below, above).map(dtype)
    return st.sampled_from(NUMPY_INTS).flatmap(of)


def int_outside(lo: int, hi: int):
    """A Python or numpy integer outside ``[lo, hi)``, huge ones (past 2**64) included."""
    return st.one_of(
        st.integers(max_value=lo - 1), st.integers(min_value=hi),
        st.integers(2**63 - 2, 2**80), st.integers(-(2**80), -(2**63) + 2).filter(lambda v: v < lo),
        numpy_int_outside(lo, hi),
    )


NOT_AN_INT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-3, 3).map(float),  # integral floats are floats too
    st.floats(-10, 10).map(np.float64), st.floats(-10, 10, width=32).map(np.float32),
    st.booleans(), st.booleans().map(np.bool_),
    st.text(max_size=4), st.just("0"),
    st.lists(st.integers(0, 3), max_size=3), st.just((1,)),
    st.just(1 + 2j), st.just(b"\x00"),
)


def bad_int(lo: int, hi: int):
    """Anything that is not an integer in ``[lo, hi)`` (None not included: it often means "default")."""
    return st.one_of(NOT_AN_INT, int_outside(lo, hi))


def name_of(value) -> str:
    return validate.show(value)


# ------------------------------------------------------------------ scalars at the store
@PROPERTY
@given(value=bad_int(0, SPEC.num_layers))
def test_bad_layer_is_refused_everywhere(value):
    store, (a, b), pq_store, trained, _ = world()
    kv = random_kv(SPEC, 1, seed=5)
    q = torch.ones(1, SPEC.num_q_heads, SPEC.head_dim)
    named = name_of(value)
    for call in (
        lambda: store.num_tokens(a, value),
        lambda: store.read(a, layer=value),
        lambda: store.append(b, kv[0, 0], kv[0, 1], layer=value),
        lambda: store.fetch(a, value, torch.zeros(SPEC.num_kv_heads, 1, dtype=torch.long)),
        lambda: store.gather_keys(a, value, torch.zeros(SPEC.num_kv_heads, 1, dtype=torch.long)),
        lambda: store.attend(a, value, q),
    ):
        refused(store, call, named, OutOfRangeError)
    refused(pq_store, lambda: pq_store.select(trained, value, q[0], 4), named, OutOfRangeError)


@PROPERTY
@given(value=st.one_of(NOT_AN_INT, int_outside(0, 2), st.none()))
def test_bad_sequence_id_is_refused_everywhere(value):
    store, (a, b), pq_store, trained, _ = world()
    kv = random_kv(SPEC, 1, seed=6)
    q = torch.ones(SPEC.num_q_heads, SPEC.head_dim)
    named = name_of(value)
    for call in (
        lambda: store.num_tokens(value),
        lambda: store.block_table(value),
        lambda: store.device_block_table(value),
        lambda: store.append(value, kv[:, 0], kv[:, 1]),
        lambda: store.read(value),
        lambda: store.fork(value),
        lambda: store.free(value),
        lambda: store.attend(value, 0, q[None]),
    ):
        refused(store, call, named)
    refused(pq_store, lambda: pq_store.select(value, 0, q, 4), named)
    refused(pq_store, lambda: pq_store.select_many([trained, value], 0, q.expand(2, -1, -1), [4, 4]), named)


@PROPERTY
@given(value=st.one_of(NOT_AN_INT, st.integers(max_value=-1), st.integers(2**63, 2**90), numpy_int_outside(0, 2**63)))
def test_bad_new_sequence_id_is_refused(value):
    store = world()[0]
    refused(store, lambda: store.create(value), name_of(value), ConfigError)


@PROPERTY
@given(value=st.one_of(
    st.floats().filter(lambda f: not 0.0 < f <= 1.0), st.booleans(), st.text(max_size=3), st.none(),
    st.lists(st.integers(1, 4), max_size=2), st.integers(max_value=0), numpy_int_outside(1, 2**65),
    st.floats(1.5, 100).map(np.float64),
))
def test_bad_budget_is_refused_trained_or_not(value):
    _, _, pq_store, trained, untrained = world()
    q = torch.ones(SPEC.num_q_heads, SPEC.head_dim)
    for seq in (trained, untrained):
        refused(pq_store, lambda: pq_store.select(seq, 0, q, value), name_of(value), ConfigError)


@PROPERTY
@given(value=bad_int(1, 41))
def test_bad_search_k_is_refused(value):
    index = world()[2]._pq[world()[3]].indexes[0]
    ntotal = index.ntotal
    with pytest.raises(KVStoreError) as info:
        index.search(torch.ones(SPEC.num_kv_heads, 1, SPEC.head_dim), value)
    assert name_of(value) in str(info.value) and index.ntotal == ntotal


# ------------------------------------------------------------------ arrays of ids and positions
def bad_index_arrays(lo: int, hi: int):
    """``(values, what the message must name)``: an id/position array with one bad entry or a bad dtype."""
    good = st.lists(st.integers(lo, hi - 1), min_size=0, max_size=3)

    def with_bad(pair):
        items, bad = pair
        return items + [bad], name_of(bad)

    return st.one_of(
        st.tuples(good, bad_int(lo, hi)).map(with_bad),
        numpy_int_outside(lo, hi).map(lambda v: (np.array([lo, v], dtype=type(v)), str(int(v)))),
        st.sampled_from([np.float64, np.float32, np.bool_, np.complex64]).map(
            lambda dt: (np.array([lo, lo], dtype=dt), str(np.dtype(dt)))),
        st.sampled_from([torch.float32, torch.float64, torch.bool, torch.float16]).map(
            lambda dt: (torch.tensor([lo, lo]).to(dt), str(dt))),
        st.sampled_from(TORCH_INTS).flatmap(lambda dt: st.integers(hi, torch.iinfo(dt).max).map(
            lambda v: (torch.tensor([lo, v], dtype=dt), str(v)))) if hi < 127 else st.nothing(),
        st.sampled_from(["01", 3.5, {"ids": [0]}]).map(lambda v: (v, name_of(v))),
    )


def test_bad_index_array_values_name_themselves():
    """The cases the property below is built on, written out once."""
    store, (a, _), _, _, _ = world()
    n_blocks = store._next_id
    refused(store, lambda: store.residency(np.array([0, 2**64 - 1], dtype=np.uint64)), "18446744073709551615", OutOfRangeError)
    refused(store, lambda: store.read(a, [0, 2**64]), "18446744073709551616", OutOfRangeError)
    refused(store, lambda: store.read(a, [0, 1.0]), "1.0", ShapeError)
    refused(store, lambda: store.read(a, [True]), "True", ShapeError)
    refused(store, lambda: store.read(a, torch.tensor([0.5, 1.5])), "torch.float32", ShapeError)
    refused(store, lambda: store.read(a, np.array(["1"])), "<U1", ShapeError)
    refused(store, lambda: store.gather_keys(a, 0, torch.full((SPEC.num_kv_heads, 1), 1.5)), "integers", ShapeError)
    refused(store, lambda: store.ensure_resident([n_blocks]), str(n_blocks), OutOfRangeError)


@PROPERTY
@given(case=bad_index_arrays(0, 10))
def test_bad_positions_are_refused(case):
    values, named = case
    store, (a, _), _, _, _ = world()
    refused(store, lambda: store.read(a, values), named)
    refused(store, lambda: store.read(a, values, layer=1), named)


@PROPERTY
@given(data=st.data())
def test_bad_block_ids_are_refused_by_every_tier_move(data):
    store = world()[0]
    values, named = data.draw(st.one_of(bad_index_arrays(0, store._next_id), st.just((None, "None"))))
    for call in (store.residency, store.offload, store.load, store.ensure_resident, store.drop):
        refused(store, lambda: call(values), named)


# ------------------------------------------------------------------ numpy integers are integers
@PROPERTY
@given(dtype=st.sampled_from(NUMPY_INTS), data=st.data())
def test_numpy_integers_in_range_act_as_python_ints(dtype, data):
    store, (a, b), pq_store, trained, untrained = world()
    layer = data.draw(st.integers(0, SPEC.num_layers - 1))
    n = store.num_tokens(a)
    pos = data.draw(st.lists(st.integers(0, min(n - 1, np.iinfo(dtype).max)), min_size=1, max_size=4))
    assert store.num_tokens(dtype(a), dtype(layer)) == store.num_tokens(a, layer)
    assert torch.equal(store.block_table(dtype(a)), store.block_table(a))
    for got, want in zip(store.read(dtype(a), np.array(pos, dtype=dtype), layer=dtype(layer)), store.read(a, pos, layer=layer)):
        assert torch.equal(got, want)
    assert torch.equal(store.read(a, [dtype(p) for p in pos])[0], store.read(a, pos)[0])
    ids = store.block_table(a).numpy()
    assert np.array_equal(store.residency(ids.astype(dtype)), store.residency(ids.tolist()))
    q = torch.ones(SPEC.num_q_heads, SPEC.head_dim)
    for seq in (trained, untrained):
        got, want = pq_store.select(dtype(seq), dtype(layer), q, dtype(3)), pq_store.select(seq, layer, q, 3)
        assert torch.equal(got.positions, want.positions)
    assert PQIndex(dtype(8), dtype(2), dtype(4)).bits == 4
    store.check()


def test_numpy_ids_at_create_and_configs():
    store = KVStore(SPEC, device_blocks=2, device=CPU)
    seq = store.create(np.uint64(2**63 - 1))
    assert type(seq) is int and seq == 2**63 - 1 and seq in store.sequences
    kv = random_kv(SPEC, 5, seed=7)
    store.append(np.int64(seq), kv[:, 0], kv[:, 1])
    assert store.num_tokens(seq) == 5 and store.blocks.seq[store.block_table(seq)].tolist() == [seq, seq]
    spec = KVSpec(num_layers=np.int64(2), num_kv_heads=np.uint8(2), num_q_heads=np.int32(4), head_dim=np.int16(8), dtype=torch.float32)
    assert spec == SPEC.replace(block_size=16) and type(spec.num_layers) is int
    for bad in (2**70, 2**63, -1):
        with pytest.raises(ConfigError, match=str(bad)):
            store.create(bad)
    store.check()


# ------------------------------------------------------------------ tensors: grad, heads, NaN
def test_kv_that_requires_grad_is_refused():
    store, (a, b), _, _, _ = world()
    kv = random_kv(SPEC, 2, seed=8).requires_grad_()
    refused(store, lambda: store.append(b, kv[:, 0], kv[:, 1]), "requires grad", ShapeError)
    refused(store, lambda: store.append(b, kv[0, 0], kv[0, 1], layer=0), "requires grad", ShapeError)
    assert not store.device_pool.kv.requires_grad


def bad_tensor(shape: tuple[int, ...]):
    """``(make, error, named)``: ``make(good)`` turns a good tensor of ``shape`` into a bad one
    (wrong dtype, shape, device, requires grad, a NaN or Inf, or no tensor at all), which the
    store refuses with ``error`` naming ``named``."""
    def reshaped(dim, delta):
        def make(t):
            size = list(t.shape)
            size[dim] = max(size[dim] + delta, 0) if size[dim] + delta != size[dim] else size[dim] + 1
            return torch.ones(size, dtype=t.dtype)
        return make

    def nonfinite(value, where):
        def make(t):
            t = t.clone()
            t.view(-1)[where % t.numel()] = value
            return t
        return make

    dims = len(shape)
    return st.one_of(
        st.sampled_from([torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool]).map(
            lambda dt: (lambda t: t.to(dt), ShapeError, "dtype")),
        st.tuples(st.integers(1 if shape[0] is None else 0, dims - 1), st.sampled_from([-1, 1, 3])).filter(
            lambda c: shape[c[0]] is not None).map(lambda c: (reshaped(*c), ShapeError, "shape")),
        st.just((lambda t: t[0], ShapeError, "shape")),
        st.just((lambda t: t[None], ShapeError, "shape")),
        st.just((lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"), ShapeError, "meta")),
        st.just((lambda t: t.clone().requires_grad_(), ShapeError, "requires grad")),
        st.tuples(st.sampled_from([float("nan"), float("inf"), -float("inf")]), st.integers(0, 10**6)).map(
            lambda c: (nonfinite(*c), NonFiniteError, "NaN/Inf")),
        st.sampled_from([lambda t: t.tolist(), lambda t: t.numpy(), lambda t: None]).map(lambda f: (f, ShapeError, "")),
    )


@PROPERTY
@given(data=st.data(), per_layer=st.booleans(), which=st.sampled_from(["k", "v", "both"]), t=st.integers(1, 6))
def test_bad_kv_tensors_are_refused_by_append(data, per_layer, which, t):
    """K/V of a wrong dtype, shape or device, that require grad, hold NaN/Inf or are no tensor:
    a typed error naming the fault, and the store (pools included) as it was."""
    store, (_, b), _, _, _ = world()
    kv = random_kv(SPEC, t, seed=10)
    shape = (None, SPEC.num_kv_heads, SPEC.head_dim) if per_layer else (SPEC.num_layers, None, SPEC.num_kv_heads, SPEC.head_dim)
    make, error, named = data.draw(bad_tensor(shape))
    k, v = (kv[0, 0], kv[0, 1]) if per_layer else (kv[:, 0], kv[:, 1])
    k = make(k) if which in ("k", "both") else k
    v = make(v) if which in ("v", "both") else v
    kwargs = {"layer": 0} if per_layer else {}
    refused(store, lambda: store.append(b, k, v, **kwargs), named if which != "v" or named != "shape" else "", error)


@PROPERTY
@given(data=st.data(), tq=st.integers(1, 3), layer=st.integers(0, SPEC.num_layers - 1))
def test_bad_queries_and_positions_are_refused_by_attend_and_fetch(data, tq, layer):
    store, (a, _), pq_store, trained, _ = world()
    attn_store, s = attention_world()
    q = torch.randn(tq, SPEC.num_q_heads, 64, generator=torch.Generator().manual_seed(11))
    # the store's dtype on its device, never requiring grad (kvstore is inference-only)
    make, error, _ = data.draw(bad_tensor((None, SPEC.num_q_heads, 64)))
    bad_q = make(q)
    refused(attn_store, lambda: attn_store.attend(s, layer, bad_q), "", error)
    positions = torch.zeros(SPEC.num_kv_heads, 3, dtype=torch.int64)  # integers cannot require grad
    make, _, _ = data.draw(bad_tensor((SPEC.num_kv_heads, None)).filter(lambda c: c[1] is ShapeError and c[2] not in ("dtype", "requires grad")))
    refused(store, lambda: store.fetch(a, layer, make(positions)), "", ShapeError)
    refused(store, lambda: store.fetch(a, layer, positions.double()), "integers", ShapeError)
    # select's queries follow attend's rules: the store's dtype, no grad
    qs = torch.ones(SPEC.num_q_heads, SPEC.head_dim)
    make, error, _ = data.draw(bad_tensor((SPEC.num_q_heads, SPEC.head_dim)))
    refused(pq_store, lambda: pq_store.select(trained, layer, make(qs), 4), "", error)
    # a bad scale is refused before attend moves anything (the sequence is partly off the device)
    for scale in (float("nan"), 0.0, -1.0, float("inf"), "x", True):
        refused(attn_store, lambda: attn_store.attend(s, layer, q, scale=scale), "scale", ConfigError)


@functools.lru_cache(maxsize=None)
def attention_world():
    """A store with a head_dim attention takes, its sequence on the device, in the host tier and dropped."""
    spec = SPEC.replace(head_dim=64)
    truth = Recompute()
    store = KVStore(spec, device_blocks=3, host_blocks=2, recompute=truth, device=CPU)
    s = store.create()
    truth.kv[s] = random_kv(spec, 22, seed=12)
    for start in range(0, 22, 4):
        store.append(s, truth.kv[s][:, 0, start : start + 4], truth.kv[s][:, 1, start : start + 4])
    assert {int(t) for t in store.residency(store.block_table(s))} == {0, 1, 3}
    return store, s


@pytest.mark.parametrize("heads", [SPEC.num_kv_heads, 2 * SPEC.num_q_heads, SPEC.num_q_heads + 1, 1])
def test_query_heads_must_equal_the_specs_trained_or_not(heads):
    _, _, pq_store, trained, untrained = world()
    for seq in (trained, untrained):
        q = torch.ones(heads, SPEC.head_dim)
        refused(pq_store, lambda: pq_store.select(seq, 0, q, 4), str((heads, SPEC.head_dim)), ShapeError)
        refused(pq_store, lambda: pq_store.select_many([seq], 0, q[None], [4]), str((1, heads, SPEC.head_dim)), ShapeError)
    q = torch.ones(SPEC.num_q_heads, SPEC.head_dim)
    for seq in (trained, untrained):  # the store's dtype, no grad: no silent casts, inference only
        refused(pq_store, lambda: pq_store.select(seq, 0, q.double(), 4), "torch.float64", ShapeError)
        refused(pq_store, lambda: pq_store.select_many([seq], 0, q[None].half(), [4]), "torch.float16", ShapeError)
        refused(pq_store, lambda: pq_store.select(seq, 0, q.clone().requires_grad_(), 4), "require grad", ShapeError)
        refused(pq_store, lambda: pq_store.select_many([seq, seq], 0, q.expand(2, -1, -1), [4]), "1 budgets for 2", ShapeError)
    refused(pq_store, lambda: pq_store.select(trained, 0, q.tolist(), 4), "[[1.0", ShapeError)
    refused(pq_store, lambda: pq_store.select_many([trained], 0, [q.tolist()], [4]), "[[1.0", ShapeError)
    refused(pq_store, lambda: pq_store.select(untrained, 0, q.long(), 4), "torch.int64", ShapeError)


@pytest.mark.parametrize("fault", ["nan", "inf", "grad", "raise"])
def test_recompute_output_is_validated_before_it_is_stored(fault):
    truth = Recompute()
    store = KVStore(SPEC, device_blocks=4, host_blocks=0, recompute=truth, device=CPU)
    s = store.create()
    truth.kv[s] = random_kv(SPEC, 6, seed=9)
    store.append(s, truth.kv[s][:, 0], truth.kv[s][:, 1])
    store.drop(store.block_table(s))
    truth.fault = fault
    error, named = {
        "grad": (ShapeError, "requires grad"),
        "raise": (RecomputeError, "recompute(0, 0, 4) of block 0 raised RuntimeError: the engine failed"),
    }.get(fault, (NonFiniteError, "recompute(0, 0, 4) output hold 1 NaN/Inf"))
    refused(store, lambda: store.ensure_resident(store.block_table(s)), named, error)
    refused(store, lambda: store.read(s), named, error)
    refused(store, lambda: store.fetch(s, 1, torch.tensor([[0, 5], [1, 4]])), named, error)
    truth.fault = None
    store.ensure_resident(store.block_table(s))
    assert torch.equal(store.read(s)[0], truth.kv[s][:, 0])


# ------------------------------------------------------------------ sizes, devices, configs
@pytest.mark.parametrize("slots", [2**80, 2**40, np.uint64(2**64 - 1)])
def test_a_tier_past_int64_offsets_is_a_config_error(slots):
    with pytest.raises(ConfigError, match=str(int(slots))):
        BlockPool(SPEC, slots, name="host")


def test_a_tier_larger_than_memory_is_a_config_error_naming_bytes():
    with pytest.raises(ConfigError, match=r"host tier: 68719476736 blocks x \d+ bytes = .* GiB exceeds this machine's memory"):
        BlockPool(SPEC, 2**36, name="host")


@pytest.mark.parametrize("dev", ["gpu:x", "cuda:-1", "", 3, None, "cuda:99", "mps"])
def test_a_bad_device_is_a_config_error(dev):
    if dev == "cuda:99" and torch.cuda.device_count() > 99:
        pytest.skip("this machine has 100 GPUs")
    with pytest.raises(ConfigError, match="device") as info:
        BlockPool(SPEC, 2, device=dev)
    assert validate.show(dev) in str(info.value)


@pytest.mark.parametrize("kwargs, named", [({"host_blocks": 2**80}, str(2**80)), ({"device": "gpu:x"}, "'gpu:x'")])
def test_store_construction_refuses_a_bad_device_or_size(kwargs, named):
    with pytest.raises(ConfigError, match=named):
        KVStore(SPEC, device_blocks=4, **kwargs)


def test_store_construction_takes_numpy_sizes():
    store = KVStore(SPEC, device_blocks=np.int64(4), host_blocks=np.uint32(2), device=CPU)
    assert (store.device_pool.num_slots, store.host_pool.num_slots) == (4, 2)


@pytest.mark.parametrize(
    "call, named",
    [
        (lambda: validate.number(float("inf"), "cold_tier.max_gib", lo=0.0, lo_open=True), "inf"),
        (lambda: validate.number(float("nan"), "cold_tier.max_gib", lo=0.0), "nan"),
        (lambda: validate.number(True, "cold_tier.max_gib", lo=0.0), "True"),
        (lambda: validate.number("2", "cold_tier.max_gib", lo=0.0), "'2'"),
        (lambda: validate.tier_blocks(2**80, "host_blocks"), str(2**80)),
        (lambda: validate.tier_blocks(4.0, "host_blocks"), "4.0"),
        (lambda: validate.mapping([("a", 1)], "extra_config"), "[('a', 1)]"),
        (lambda: validate.mapping("x=1", "extra_config"), "'x=1'"),
        (lambda: validate.mapping({1: 2}, "extra_config"), "1"),
        (lambda: ModelCost(num_params=float("inf"), hidden_size=8, num_layers=2), "inf"),
        (lambda: KVSpec(num_layers=2.0, num_kv_heads=2, num_q_heads=4, head_dim=8), "2.0"),
        (lambda: KVSpec(num_layers=True, num_kv_heads=2, num_q_heads=4, head_dim=8), "True"),
    ],
)
def test_config_values_are_checked_by_value(call, named):
    with pytest.raises(ConfigError) as info:
        call()
    assert named in str(info.value)


def _connector_config(extra):
    from kvstore.integrations.vllm.config import KVStoreConnectorConfig

    return KVStoreConnectorConfig.from_extra_config(extra)


def _replay_config(**kwargs):
    from kvstore.evict.replay import ReplayConfig

    return ReplayConfig(**kwargs)


@pytest.mark.parametrize(
    "call, named",
    [
        (lambda: _connector_config("host_blocks=4"), "kv_connector_extra_config must be a dict, got 'host_blocks=4'"),
        (lambda: _connector_config([("host_blocks", 4)]), "must be a dict"),
        (lambda: _connector_config({1: 2}), "keys must be strings, got 1"),
        (lambda: _connector_config({"host_blocks": 2**80}), f"host_blocks {2**80} out of range"),
        (lambda: _connector_config({"host_blocks": 4.0}), "host_blocks 4.0 must be an integer"),
        (lambda: _connector_config({"host_blocks": True}), "host_blocks True must be an integer"),
        (lambda: _connector_config({"block_size": 0}), "block_size 0 out of range"),
        (lambda: _connector_config({"cold_tier": {"path": "/tmp/kv", "max_gib": float("inf")}}), "cold_tier.max_gib inf"),
        (lambda: _replay_config(capacity_blocks=2**80), f"ReplayConfig.capacity_blocks {2**80} out of range"),
        (lambda: _replay_config(capacity_blocks=8.0), "ReplayConfig.capacity_blocks 8.0 must be an integer"),
        (lambda: _replay_config(capacity_blocks=8, host_blocks=-1), "ReplayConfig.host_blocks -1 out of range"),
        (lambda: _replay_config(capacity_blocks=8, model=3), "ReplayConfig.model must be a preset name, got 3"),
        (lambda: _replay_config(capacity_blocks=8, cost="tiny"), "ReplayConfig.cost must be a CostModel"),
    ],
)
def test_connector_and_replay_configs_go_through_the_same_checks(call, named):
    with pytest.raises(ConfigError) as info:
        call()
    assert named in str(info.value)


def test_connector_and_replay_configs_take_numpy_integers():
    config = _connector_config({"host_blocks": np.int64(64), "block_size": np.uint16(32)})
    assert (config.host_blocks, config.block_size) == (64, 32) and type(config.host_blocks) is int
    assert _replay_config(capacity_blocks=np.int32(8)).capacity_blocks == 8


def test_an_empty_trace_is_named_as_empty(tmp_path):
    from kvstore.evict.replay import replay

    (tmp_path / "empty.jsonl").write_text("\n  \n")
    for fmt in ("jsonl", "mooncake"):
        with pytest.raises(TraceFormatError, match="empty.jsonl: the trace holds no requests"):
            load_trace(tmp_path / "empty.jsonl", fmt)
    for leaves_only in (False, True):
        with pytest.raises(ConfigError, match="holds no requests, there is nothing to replay"):
            replay(Trace.from_requests([]), "lru", _replay_config(capacity_blocks=4, leaves_only=leaves_only))


def test_connector_style_values_pass_when_good():
    assert validate.number(np.float32(1.5), "max_gib", lo=0.0, lo_open=True) == 1.5
    assert validate.tier_blocks(np.uint32(7), "host_blocks") == 7
    assert validate.mapping(None, "extra_config") == {} and validate.mapping({"a": 1}, "extra_config") == {"a": 1}
    assert validate.device("cpu", "device") == torch.device("cpu")


# ------------------------------------------------------------------ the trace loader
@PROPERTY
@given(value=st.one_of(NOT_AN_INT.filter(lambda v: not isinstance(v, (list, tuple))), st.integers(max_value=-1), st.integers(2**63, 2**70)))
def test_trace_ids_are_refused_not_truncated(value):
    with pytest.raises(TraceFormatError) as info:
        Trace.from_requests([[0, 1], [0, value]], block_tokens=4)
    assert name_of(value) in str(info.value) and "<memory>:2" in str(info.value)


def test_trace_arguments_are_checked(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"blocks": [0, 1]}\n')
    assert Trace.from_requests([np.array([0, 1], dtype=np.uint8)], block_tokens=np.int64(4)).num_unique_blocks == 2
    for kwargs, named in [({"block_tokens": 2.0}, "2.0"), ({"limit": -1}, "-1"), ({"limit": 1.5}, "1.5"), ({"format": ["jsonl"]}, "['jsonl']")]:
        with pytest.raises(ConfigError) as info:
            load_trace(path, **{"format": "jsonl", **kwargs})
        assert named in str(info.value)
    with pytest.raises(ConfigError, match="3"):
        load_trace(3, "jsonl")
    with pytest.raises(TraceFormatError, match=str(2**64)):
        Trace.from_requests([[0]], input_lengths=[2**64], block_tokens=4)


# ------------------------------------------------------------------ the PQ index's other entry points
def test_pq_index_inputs_are_typed_errors():
    _, _, pq_store, trained, _ = world()
    index = pq_store._pq[trained].indexes[0]
    H, M = SPEC.num_kv_heads, index.num_subspaces
    codes_before = index.codes.clone()
    for call, error, named in [
        (lambda: index.decode([[0]]), ShapeError, "[[0]]"),
        (lambda: index.decode(torch.zeros(H, 2, M, dtype=torch.long)), ShapeError, "torch.int64"),
        (lambda: index.decode(torch.full((H, 2, M), 16, dtype=torch.uint8)), OutOfRangeError, "16"),
        (lambda: index.load_state_dict([1, 2]), ConfigError, "[1, 2]"),
        (lambda: index.search(torch.ones(H, 1, SPEC.head_dim).tolist(), 3), ShapeError, "list"),
        (lambda: pq_store.select_many([trained], 0, torch.tensor(1.0), [4]), ShapeError, "()"),
        (lambda: index.search(torch.ones(H, 1, SPEC.head_dim, dtype=torch.long), 3), ShapeError, "torch.int64"),
        (lambda: index.add(torch.ones(H, 2, SPEC.head_dim, requires_grad=True)), ShapeError, "require grad"),
        (lambda: index.train(torch.ones(H, 64, SPEC.head_dim, requires_grad=True)), ShapeError, "require grad"),
        (lambda: index.train(torch.empty(H, 64, SPEC.head_dim, device="meta")), ShapeError, "meta"),
        (lambda: PQIndex(2**70), ConfigError, str(2**70)),
    ]:
        with pytest.raises(error) as info:
            call()
        assert named in str(info.value)
    assert torch.equal(index.codes, codes_before)


def test_membership_of_any_value_is_a_bool():
    store, (a, _), _, _, _ = world()
    assert np.int64(a) in store and [a] not in store and float(a) not in store and True not in store and "0" not in store


def test_a_range_is_an_index_array():
    """``range`` works wherever a list of ids does, bounds checked without listing it."""
    assert validate.index_array(range(1, 7, 2), "ids", lo=0, hi=8).tolist() == [1, 3, 5]
    assert validate.index_array(range(0), "ids", lo=0, hi=1).size == 0
    with pytest.raises(OutOfRangeError, match=r"ids \[-1\] out of range \[0, 8\)"):
        validate.index_array(range(-1, 3), "ids", lo=0, hi=8)
    with pytest.raises(OutOfRangeError, match=str(2**70 - 1)):
        validate.index_array(range(2**70 - 2, 2**70), "ids", lo=0, hi=2**63)
    store, (a, _), _, _, _ = world()
    assert torch.equal(store.read(a, range(3))[0], store.read(a, [0, 1, 2])[0])


@pytest.mark.parametrize("call, error, named", [
    (lambda: BlockInfo(-1), ConfigError, "BlockInfo capacity -1"),
    (lambda: BlockInfo(2.5), ConfigError, "BlockInfo capacity 2.5"),
    (lambda: BlockInfo(2**70), ConfigError, str(2**70)),
    (lambda: BlockInfo(8).link([1.5], [0]), ShapeError, "1.5"),
    (lambda: BlockInfo(8).link([1, 2], [0]), ShapeError, "2 blocks but 1 parents"),
    (lambda: BlockInfo(8).link([100], [0]), OutOfRangeError, "[100] out of range [0, 16)"),
    (lambda: BlockInfo(8).link([1], [-2]), OutOfRangeError, "[-2] out of range [-1, 16)"),
])
def test_block_info_checks_its_sizes_and_links(call, error, named):
    with pytest.raises(error) as info:
        call()
    assert named in str(info.value)
