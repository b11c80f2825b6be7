"""KVStoreConnector against the real vLLM 0.32 Scheduler and real CPU KV caches."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

pytest.importorskip("vllm")

from vllm_helpers import BLOCK, LAYERS, make_kv_caches, make_request, make_scheduler, make_worker  # noqa: E402

from kvstore.errors import ConfigError  # noqa: E402
from kvstore.evict import POLICIES, make_policy  # noqa: E402
from kvstore.integrations.vllm import BlockCopy, KVStoreConnector, KVStoreConnectorMetadata  # noqa: E402

NUM_BLOCKS = 128


class Engine:
    """The real Scheduler plus a worker connector driven the way vLLM's model runner drives it
    (bind, start_load_kv, per layer wait_for_layer_load then save_kv_layer, wait_for_save,
    get_finished, errors, worker meta, clear), recording every call."""

    def __init__(self, base, hasher, extra, layout="contiguous"):
        self.sched = make_scheduler(base, extra, NUM_BLOCKS)
        self.worker = make_worker(base, extra, NUM_BLOCKS)
        self.caches = make_kv_caches(NUM_BLOCKS, layout)
        self.worker.register_kv_caches(self.caches)
        self.hasher = hasher
        self.calls: list[str] = []
        conn = self.sched.connector
        for name in ("get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta", "request_finished"):
            orig = getattr(conn, name)

            def rec(*a, _n=name, _f=orig, **k):
                self.calls.append(_n)
                return _f(*a, **k)

            setattr(conn, name, rec)

    def add(self, req_id, tokens, max_tokens=4):
        self.sched.add_request(make_request(req_id, tokens, self.hasher, max_tokens))

    def step(self):
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

        out = self.sched.schedule()
        meta, w = out.kv_connector_metadata, self.worker
        assert isinstance(meta, KVStoreConnectorMetadata)
        w.bind_connector_metadata(meta)
        w.start_load_kv(None)
        for name in LAYERS:
            w.wait_for_layer_load(name)
            w.save_kv_layer(name, self.caches[name], None)
        w.wait_for_save()
        sending, recving = w.get_finished(out.finished_req_ids)
        kvo = KVConnectorOutput(
            finished_sending=sending, finished_recving=recving,
            invalid_block_ids=w.get_block_ids_with_load_errors(), kv_connector_worker_meta=w.build_connector_worker_meta(),
        )
        w.clear_connector_metadata()
        reqs = list(out.num_scheduled_tokens)
        mro = ModelRunnerOutput(
            req_ids=reqs, req_id_to_index={r: i for i, r in enumerate(reqs)},
            sampled_token_ids=[[7] for _ in reqs], kv_connector_output=kvo,
        )
        self.sched.update_from_output(out, mro)
        return out, meta, kvo

    def run(self, steps):
        return [self.step() for _ in range(steps)]


def _tokens(n, seed):
    return np.random.default_rng(seed).integers(1, 999, n).tolist()


def test_scheduler_call_sequence_save_finish_and_hit(worker_streams, base_vllm_config, block_hasher):
    eng = Engine(base_vllm_config, block_hasher, {"host_blocks": 64, "policy": "lru"})
    prompt = _tokens(60, 1)
    eng.add("a", prompt, max_tokens=8)
    out, meta, _ = eng.step()
    assert eng.calls == ["get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta"]
    assert len(meta.saves) == 3 and not meta.loads  # 3 full prompt blocks saved layer by layer
    gpu_a = out.scheduled_new_reqs[0].block_ids[0]
    assert meta.saves.gpu_blocks.tolist() == gpu_a[:3]
    saved = {b: {n: eng.caches[n][b].clone() for n in LAYERS} for b in gpu_a[:4]}
    steps = eng.run(8)
    assert "request_finished" in eng.calls
    finish_meta = [m for _, m, _ in steps if m.finished_saves]
    assert len(finish_meta) == 1 and len(finish_meta[0].finished_saves["a"]) == 1  # decode block 4 saved at finish
    assert any("a" in (kvo.finished_sending or ()) for _, _, kvo in steps)
    assert len(eng.sched.connector.scheduler.index) == 4

    # A second request with the same 64-token prefix, GPU prefix cache cleared: 4 blocks load.
    assert eng.sched.reset_prefix_cache()
    for b in saved:  # scribble over the old GPU blocks: the load must restore them from the host
        for n in LAYERS:
            eng.caches[n][b].normal_()
    eng.calls.clear()
    eng.add("b", prompt + [7] * 8 + [3])  # a's decode wrote 7s: its 4th block is prompt[48:] + 7 7 7 7
    out, meta, kvo = eng.step()
    assert eng.calls[:3] == ["get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta"]
    assert out.scheduled_new_reqs[0].num_computed_tokens == 64
    assert set(meta.loads) == {"b"} and not kvo.invalid_block_ids
    gpu_b = out.scheduled_new_reqs[0].block_ids[0]
    assert meta.loads["b"].gpu_blocks.tolist() == gpu_b[:4]
    for i, b in enumerate(gpu_a[:4]):
        for n in LAYERS:
            assert torch.equal(eng.caches[n][gpu_b[i]], saved[b][n]), (i, n)


def test_lookup_has_no_side_effects(worker_streams, base_vllm_config, block_hasher):
    eng = Engine(base_vllm_config, block_hasher, {"host_blocks": 8, "policy": "lru"})
    eng.add("a", _tokens(40, 3), max_tokens=1)
    eng.run(3)
    idx = eng.sched.connector.scheduler.index
    before = (dict(idx.slot_of), idx.info.last_access.copy(), list(idx.policy._order))
    req = make_request("probe", _tokens(40, 3) + [1], block_hasher)
    conn = eng.sched.connector
    assert conn.get_num_new_matched_tokens(req, 0) == (32, False)
    assert conn.get_num_new_matched_tokens(req, 16) == (16, False)
    assert conn.get_num_new_matched_tokens(make_request("x", _tokens(40, 4), block_hasher), 0) == (0, False)
    after = (dict(idx.slot_of), idx.info.last_access.copy(), list(idx.policy._order))
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2] == after[2]


@pytest.mark.parametrize("layout", ["contiguous", "nhd", "block_outer"])
@pytest.mark.parametrize("host_block", [BLOCK, 2 * BLOCK])
def test_worker_round_trip_bit_exact_layer_by_layer(worker_streams, base_vllm_config, layout, host_block):
    extra = {"host_blocks": 16, "policy": "lru", "block_size": host_block}
    w = make_worker(base_vllm_config, extra, NUM_BLOCKS)
    caches = make_kv_caches(NUM_BLOCKS, layout, seed=5)
    w.register_kv_caches(caches)
    per = host_block // BLOCK
    src, dst = [3, 9, 4, 77, 5, 6], [100, 101, 120, 64, 2, 90]
    keys = [b"k%d" % i for i in range(len(src) // per)]
    slots = [7, 2, 11, 0, 5, 13][: len(keys)]
    original = {n: caches[n][src].clone() for n in LAYERS}
    meta = KVStoreConnectorMetadata(saves=BlockCopy.build(slots, keys, src, 0, per))
    w.bind_connector_metadata(meta)
    w.start_load_kv(None)
    for n in LAYERS:
        w.save_kv_layer(n, caches[n], None)
    w.wait_for_save()
    host = w.worker.pool.kv
    assert torch.isfinite(host[slots]).all() and (host[slots] != 0).any()
    meta = KVStoreConnectorMetadata(loads={"r": BlockCopy.build(slots, keys, dst, 0, per)})
    w.bind_connector_metadata(meta)
    w.start_load_kv(None)
    for i, n in enumerate(LAYERS):
        assert not torch.equal(caches[n][dst], original[n])  # layer n not loaded before its wait
        w.wait_for_layer_load(n)
        assert torch.equal(caches[n][dst], original[n])
        for later in LAYERS[i + 1 :]:
            assert not torch.equal(caches[later][dst], original[later])
    w.wait_for_save()
    assert w.get_block_ids_with_load_errors() == set()


def test_host_layout_is_kvstore_block_layout(worker_streams, base_vllm_config):
    w = make_worker(base_vllm_config, {"host_blocks": 4, "policy": "lru"}, NUM_BLOCKS)
    caches = make_kv_caches(NUM_BLOCKS, seed=6)
    w.register_kv_caches(caches)
    w.worker.save_blocks(BlockCopy.build([1], [b"x"], [10], 0, 1))
    page = caches[LAYERS[1]][10]  # [H, N, 2D]
    host = w.worker.pool.kv[1, 1]  # [2, N, H, D]
    assert torch.equal(host[0], page[..., :32].transpose(0, 1))
    assert torch.equal(host[1], page[..., 32:].transpose(0, 1))


def test_vanished_host_copy_reports_failed_blocks(worker_streams, base_vllm_config, block_hasher):
    eng = Engine(base_vllm_config, block_hasher, {"host_blocks": 16, "policy": "lru"})
    prompt = _tokens(70, 8)
    eng.add("a", prompt, max_tokens=1)
    eng.run(3)
    idx = eng.sched.connector.scheduler.index
    assert len(idx) == 4
    keys = eng.sched.connector.scheduler._keys(make_request("p", prompt + [1], block_hasher))
    eng.worker.worker.drop([idx.slot_of[keys[2]]])
    eng.sched.reset_prefix_cache()
    eng.add("b", prompt + [1])
    out, meta, kvo = eng.step()
    failed = meta.loads["b"].gpu_blocks[2:3].tolist()
    assert kvo.invalid_block_ids == set(failed)
    assert len(idx) == 3  # the lost slot was reported back and forgotten
    eng.run(2)  # vLLM recomputes; nothing raises


def test_bad_extra_config_named(base_vllm_config):
    for extra, key in [
        ({"host_blokcs": 4}, "host_blokcs"),
        ({"host_blocks": 0}, "host_blocks"),
        ({"policy": "nope"}, "policy"),
        ({"policy": "belady"}, "policy"),
        ({"block_size": 24}, "block_size"),
        ({"cold_tier": {"path": "/tmp/x", "max_gb": 1}}, "max_gb"),
        ({"cold_tier": {"max_gib": 1}}, "path"),
    ]:
        with pytest.raises(ConfigError, match=key):
            make_worker(base_vllm_config, extra)


def test_default_policy_is_asym(base_vllm_config):
    conn = make_scheduler(base_vllm_config, {"host_blocks": 4}).connector
    assert isinstance(conn, KVStoreConnector) and conn.scheduler.index.policy.name == "asym"


def test_concurrent_saves_and_loads_lose_nothing(worker_streams, base_vllm_config):
    w = make_worker(base_vllm_config, {"host_blocks": 64, "policy": "lru"}, NUM_BLOCKS).worker
    caches = make_kv_caches(NUM_BLOCKS, seed=9)
    w.register(caches, NUM_BLOCKS)
    truth = {n: caches[n].clone() for n in LAYERS}
    errors: list[BaseException] = []

    def client(t: int) -> None:
        try:
            for rnd in range(20):
                src = [t * 8 + i for i in range(4)]
                dst = [64 + t * 8 + i for i in range(4)]
                slots = [t * 8 + i for i in range(4)]
                keys = [b"%d/%d/%d" % (t, rnd, i) for i in range(4)]
                w.save_blocks(BlockCopy.build(slots, keys, src, 0, 1))
                assert w.load_blocks(BlockCopy.build(slots, keys, dst, 0, 1)) == set()
                for n in LAYERS:
                    assert torch.equal(caches[n][dst], truth[n][src])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
    start = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not any(th.is_alive() for th in threads), "deadlock"
    assert time.monotonic() - start < 60 and not errors, errors[:1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip(worker_streams, base_vllm_config):
    w = make_worker(base_vllm_config, {"host_blocks": 8, "policy": "lru"}, NUM_BLOCKS)
    caches = {n: t.cuda() for n, t in make_kv_caches(NUM_BLOCKS, seed=11).items()}
    w.register_kv_caches(caches)
    ref = {n: caches[n][[1, 2]].clone() for n in LAYERS}
    w.worker.save_blocks(BlockCopy.build([0, 1], [b"a", b"b"], [1, 2], 0, 1))
    assert w.worker.load_blocks(BlockCopy.build([0, 1], [b"a", b"b"], [5, 6], 0, 1)) == set()
    for n in LAYERS:
        assert torch.equal(caches[n][[5, 6]], ref[n])


class _PlainTwin:
    """Stands in for the host index's policy: forwards every call to ``policy`` and to ``plain``,
    a second instance of the same policy whose ``victims`` gets the protected blocks as an id
    array (the plain protocol), and checks that both name the same victims."""

    def __init__(self, policy, plain):
        self.policy, self.plain = policy, plain
        self.protected_calls = 0

    def on_insert(self, blocks):
        self.policy.on_insert(blocks)
        self.plain.on_insert(blocks)

    def on_access(self, blocks):
        self.policy.on_access(blocks)
        self.plain.on_access(blocks)

    def on_remove(self, blocks):
        self.policy.on_remove(blocks)
        self.plain.on_remove(blocks)

    def victims(self, n, protected=None):
        got = self.policy.victims(n, protected)
        ids = np.flatnonzero(protected) if protected is not None else None
        assert got.tolist() == self.plain.victims(n, ids).tolist()
        assert ids is None or not np.isin(got, ids).any()
        self.protected_calls += ids is not None and ids.size > 0
        return got


@pytest.mark.parametrize("policy", sorted(n for n, c in POLICIES.items() if not c.offline))
def test_full_tier_admission_evicts_what_the_plain_policy_names(policy):
    """Admissions into a full host tier (hits pinned for the step, new blocks saved, each save
    evicting): the pin mask handed to the policy names exactly the victims that the same
    policy names when given the pinned slots as ids."""
    from types import SimpleNamespace

    from kvstore.evict.cost import CostModel
    from kvstore.integrations.vllm import KVStoreConnectorConfig, _SchedulerSide
    from kvstore.spec import KVSpec

    spec, hits, prefixes = KVSpec.preset("tiny"), 8, 6
    bs = spec.block_size
    side = _SchedulerSide(KVStoreConnectorConfig(host_blocks=hits * prefixes, policy=policy), spec, bs, CostModel.preset("tiny"))
    index = side.index
    twin = index.policy = _PlainTwin(index.policy, make_policy(policy, index.info))

    def key(i):
        return i.to_bytes(8, "little", signed=True) * 4

    for p in range(prefixes):
        index.insert([key(100 * p + j) for j in range(hits)], [j * bs for j in range(hits)])
    assert index.pool.num_free == 0
    rng = np.random.default_rng(3)
    evicted = 0
    for step in range(40):
        new_reqs, scheduled = [], {}
        for r in range(4):
            rid, p = f"s{step}r{r}", int(rng.integers(prefixes))
            hashes = [key(100 * p + j) for j in range(hits)] + [key(-1 - 8 * (4 * step + r) - j) for j in range(2)]
            n = (hits + 2) * bs + 1
            req = SimpleNamespace(request_id=rid, block_hashes=hashes, num_tokens=n, num_prompt_tokens=n, num_computed_tokens=0)
            ext, _ = side.get_num_new_matched_tokens(req, 0)
            side.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: ([*range(hits + 3)],)), ext)
            new_reqs.append(SimpleNamespace(req_id=rid, block_ids=([*range(hits + 3)],), num_computed_tokens=ext))
            scheduled[rid] = n - ext
        meta = side.build_connector_meta(SimpleNamespace(
            scheduled_new_reqs=new_reqs, num_scheduled_tokens=scheduled,
            scheduled_cached_reqs=SimpleNamespace(req_ids=[], new_block_ids=[], resumed_req_ids=set(), num_computed_tokens=[]),
        ))
        side.reqs.clear()
        evicted += len(meta.spills)
        assert not index.pinned.any()
    assert evicted >= 40 * 4 * 2 and twin.protected_calls > 0


def _tiny_side(policy: str, host_blocks: int):
    from kvstore.evict.cost import CostModel
    from kvstore.integrations.vllm import KVStoreConnectorConfig, _SchedulerSide
    from kvstore.spec import KVSpec

    spec = KVSpec.preset("tiny")
    return _SchedulerSide(KVStoreConnectorConfig(host_blocks=host_blocks, policy=policy), spec, spec.block_size, CostModel.preset("tiny"))


def _key8(i: int) -> bytes:
    return i.to_bytes(8, "little", signed=True) * 4


def _step(new_reqs=(), scheduled=None):
    from types import SimpleNamespace

    return SimpleNamespace(
        scheduled_new_reqs=list(new_reqs), num_scheduled_tokens=scheduled or {},
        scheduled_cached_reqs=SimpleNamespace(req_ids=[], new_block_ids=[], resumed_req_ids=set(), num_computed_tokens=[]),
    )


def _admit(side, rid: str, hashes: list[bytes], gpu_base: int):
    """Look up, allocate GPU blocks ``gpu_base..`` and return the SchedulerOutput entry of a
    new request whose prompt is ``hashes`` full blocks plus one token."""
    from types import SimpleNamespace

    bs = side.spec.block_size
    n = len(hashes) * bs + 1
    req = SimpleNamespace(request_id=rid, block_hashes=hashes, num_tokens=n, num_prompt_tokens=n, num_computed_tokens=0)
    ext, _ = side.get_num_new_matched_tokens(req, 0)
    gpu = [gpu_base + i for i in range(len(hashes) + 1)]
    side.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: (gpu,)), ext)
    return req, SimpleNamespace(req_id=rid, block_ids=(gpu,), num_computed_tokens=ext), n - ext


def test_a_block_two_requests_of_one_step_lack_is_saved_once():
    """Two requests scheduled in one step share a prefix the host tier lacks: each shared block
    gets one slot and one copy (from the first request), both requests count it as saved, and
    the index stays a bijection."""
    side = _tiny_side("asym", 32)
    shared = [_key8(j) for j in range(3)]
    a, a_new, a_n = _admit(side, "a", shared + [_key8(100)], 0)
    b, b_new, b_n = _admit(side, "b", shared + [_key8(200), _key8(201)], 10)
    meta = side.build_connector_meta(_step([a_new, b_new], {"a": a_n, "b": b_n}))
    assert sorted(meta.saves.keys) == sorted(shared + [_key8(100), _key8(200), _key8(201)])
    assert meta.saves.gpu_blocks.tolist() == [0, 1, 2, 3, 13, 14]  # shared blocks copied from a's GPU blocks
    assert side.reqs["a"].num_saved == 4 and side.reqs["b"].num_saved == 5
    index = side.index
    assert len(index) == 6 == index.pool.num_slots - index.pool.num_free
    assert all(index.key_of[s] == k for k, s in index.slot_of.items())
    assert not index.pinned.any()


@pytest.mark.parametrize("policy", ["asym", "lru"])
def test_slots_saved_this_step_are_never_victims_of_the_same_step(policy):
    """A finished request's save (planned between steps) and the next step's saves into a full
    tier: the next step's victims never include a slot whose copy is still pending, whatever
    the policy thinks of the freshly inserted blocks (asym scores them low)."""
    side = _tiny_side(policy, 8)
    old = [_key8(1000 + j) for j in range(6)]
    _, o_new, o_n = _admit(side, "old", old, 0)
    side.build_connector_meta(_step([o_new], {"old": o_n}))
    for _ in range(3):  # the old blocks collect reads: a frequency-aware policy values them
        _, r_new, r_n = _admit(side, "reader", old, 0)
        side.build_connector_meta(_step([r_new], {"reader": r_n}))
        side.reqs.clear()
    # a request finishes holding 2 blocks the tier lacks: saved asynchronously, slots assigned now
    from types import SimpleNamespace

    fin = [_key8(2000), _key8(2001)]
    done = SimpleNamespace(request_id="fin", block_hashes=fin, num_tokens=2 * side.spec.block_size,
                           num_prompt_tokens=2 * side.spec.block_size, num_computed_tokens=2 * side.spec.block_size)
    side._state(done)
    delay, _ = side.request_finished(done, [40, 41])
    assert delay
    fin_slots = {side.index.slot_of[k] for k in fin}
    # next step: a new request saves 6 blocks into the full tier
    _, n_new, n_n = _admit(side, "new", [_key8(3000 + j) for j in range(6)], 20)
    meta = side.build_connector_meta(_step([n_new], {"new": n_n}))
    assert not fin_slots & {s for s, _ in meta.spills}
    assert {side.index.slot_of[k] for k in fin} == fin_slots
    assert set(meta.finished_saves["fin"].slots.tolist()) == fin_slots
    assert len(meta.saves) == 6 and not fin_slots & set(meta.saves.slots.tolist())


def _tree_invariants(index, parent_key: dict) -> None:
    """The host index's prefix tree: parent links point at resident slots holding the parent
    key, child counts match the links, and (no slot was lost) no resident block is orphaned."""
    resident = [s for s, k in enumerate(index.key_of) if k is not None]
    for s in resident:
        p = int(index.parent[s])
        want = parent_key[index.key_of[s]]
        if want is None:
            assert p == -1
        else:
            assert p >= 0 and index.key_of[p] == want, "a cached block whose prefix is not cached"
        assert index.children[s] == sum(1 for t in resident if index.parent[t] == s)
    assert all(index.children[s] == 0 and index.parent[s] == -1 for s, k in enumerate(index.key_of) if k is None)


@pytest.mark.parametrize("policy", ["asym", "lru", "arc", "gdsf"])
def test_leaves_only_keeps_every_cached_block_reachable(policy):
    """Requests over a few shared prefixes, several per step, into a tier far smaller than their
    blocks: the host tier evicts from the leaves of its prefix tree only, so every cached block's
    whole prefix stays cached (vLLM could load it), and the tree's links stay exact."""
    side = _tiny_side(policy, 12)
    rng = np.random.default_rng(7)
    parent_key: dict[bytes, bytes | None] = {}
    evicted = 0
    for step in range(30):
        new_reqs, scheduled = [], {}
        for r in range(3):
            trunk = int(rng.integers(3))
            ids = [1000 * trunk + j for j in range(int(rng.integers(1, 5)))]  # a shared trunk
            ids += [100_000 + 10 * (3 * step + r) + j for j in range(int(rng.integers(1, 4)))]  # its own tail
            hashes = [_key8(i) for i in ids]
            for j, h in enumerate(hashes):
                parent_key.setdefault(h, hashes[j - 1] if j else None)
            _, entry, n = _admit(side, f"s{step}r{r}", hashes, 20 * r)
            new_reqs.append(entry)
            scheduled[entry.req_id] = n
        meta = side.build_connector_meta(_step(new_reqs, scheduled))
        side.reqs.clear()
        evicted += len(meta.spills)
        _tree_invariants(side.index, parent_key)
    assert evicted > 0
    assert side.index.pool.num_free == 0  # the tier ran full: evictions happened every step


def test_any_block_may_go_without_leaves_only_and_lost_inner_blocks_orphan_their_children():
    """leaves_only=False (the multi-segment view): asym takes the cheap head of a prefix and leaves
    its tail cached but unreachable. A lost inner slot (the worker reports it) unlinks its children."""
    from kvstore.evict.cost import CostModel
    from kvstore.integrations.vllm import KVStoreConnectorConfig, _SchedulerSide
    from kvstore.spec import KVSpec

    spec = KVSpec.preset("tiny")
    cfg = KVStoreConnectorConfig(host_blocks=4, policy="asym", leaves_only=False)
    side = _SchedulerSide(cfg, spec, spec.block_size, CostModel.preset("tiny"))
    chain = [_key8(j) for j in range(4)]
    _, a, n = _admit(side, "a", chain, 0)
    side.build_connector_meta(_step([a], {"a": n}))
    _, b, n = _admit(side, "b", [_key8(99)], 10)
    meta = side.build_connector_meta(_step([b], {"b": n}))
    assert [k for _, k in meta.spills] == [chain[0]]  # the head: cheapest to recompute on its own
    assert side.index.match(chain) == (0, 0) and len(side.index) == 4  # blocks 1-3 cached, none loadable

    side = _tiny_side("lru", 8)  # leaves_only
    _, a, n = _admit(side, "a", chain, 0)
    side.build_connector_meta(_step([a], {"a": n}))
    index = side.index
    inner, child = index.slot_of[chain[1]], index.slot_of[chain[2]]
    assert index.children[inner] == 1 and index.parent[child] == inner
    index.remove([inner])
    assert index.parent[child] == -1 and index.children[inner] == 0 and chain[1] not in index.slot_of


@pytest.mark.parametrize("policy", ["lru", "asym"])
def test_a_block_the_step_extends_is_not_its_victim(policy):
    """vLLM's GPU prefix cache computed a request's first block; the host tier holds that block
    as a leaf and is full. Saving the request's second block must not evict the first (it would
    cache a block whose prefix is gone): the step pins the blocks it extends. (asym scores the
    first block lowest even after the read: its recompute is the cheapest.)"""
    from types import SimpleNamespace

    side = _tiny_side(policy, 3)
    x0, x1, y0, y1 = _key8(1), _key8(2), _key8(10), _key8(11)
    for rid, hashes in (("p", [x0]), ("q", [y0, y1]), ("q2", [y0, y1]), ("q3", [y0, y1])):  # y read 3 times
        _, entry, n = _admit(side, rid, hashes, 0)
        side.build_connector_meta(_step([entry], {rid: n}))
        side.reqs.clear()
    bs = side.spec.block_size
    n = 2 * bs + 1
    req = SimpleNamespace(request_id="r", block_hashes=[x0, x1], num_tokens=n, num_prompt_tokens=n, num_computed_tokens=bs)
    ext, _ = side.get_num_new_matched_tokens(req, bs)  # the GPU cache holds x0: nothing to load
    assert ext == 0
    side.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: ([5, 6, 7],)), 0)
    meta = side.build_connector_meta(_step([SimpleNamespace(req_id="r", block_ids=([5, 6, 7],), num_computed_tokens=bs)], {"r": n - bs}))
    assert [k for _, k in meta.spills] == [y1]  # the only other leaf
    index = side.index
    assert index.parent[index.slot_of[x1]] == index.slot_of[x0]


def _links_exact(index) -> None:
    """Parent links point at resident slots, child counts match them, free slots are unlinked."""
    resident = [s for s, k in enumerate(index.key_of) if k is not None]
    counts = np.zeros(len(index.key_of), dtype=np.int64)
    for s in resident:
        p = int(index.parent[s])
        if p >= 0:
            assert index.key_of[p] is not None
            counts[p] += 1
    assert (index.children == counts).all()
    assert all(index.parent[s] == -1 for s, k in enumerate(index.key_of) if k is None)
    assert len(index.slot_of) == len(resident) and all(index.key_of[s] == k for k, s in index.slot_of.items())


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["admit", "admit", "finish", "lose"]), st.integers(0, 2**31)), min_size=1, max_size=25),
       policy=st.sampled_from(["asym", "lru", "s3fifo"]))
def test_host_index_prefix_tree_under_any_sequence(ops, policy):
    """Admissions (several per step, shared trunks), finished requests saving their decode blocks
    and slots the worker reports lost, in any order: the index stays a bijection, its tree links
    stay exact, pins are cleared with each step's metadata, and no block that a cached block
    extends is ever evicted (its successor would be stranded)."""
    from types import SimpleNamespace

    side = _tiny_side(policy, 10)
    index, bs = side.index, side.spec.block_size
    live: dict[str, SimpleNamespace] = {}
    for n_op, (op, seed) in enumerate(ops):
        rng = np.random.default_rng(seed)
        if op == "admit":
            new_reqs, scheduled = [], {}
            for r in range(int(rng.integers(1, 3))):
                trunk = int(rng.integers(2))
                ids = [1000 * trunk + j for j in range(int(rng.integers(1, 4)))] + [10_000 * (n_op + 1) + 10 * r + j for j in range(int(rng.integers(0, 3)))]
                rid = f"{n_op}.{r}"
                req, entry, n = _admit(side, rid, [_key8(i) for i in ids], 20 * r)
                new_reqs.append(entry)
                scheduled[rid] = n
                live[rid] = req
            children_of: dict[bytes, list[bytes]] = {}
            for k, s in index.slot_of.items():
                if index.parent[s] >= 0:
                    children_of.setdefault(index.key_of[index.parent[s]], []).append(k)
            meta = side.build_connector_meta(_step(new_reqs, scheduled))
            order = [k for _, k in meta.spills]
            for k in order:  # a block goes only after every block extending it (tails first)
                assert all(c in order and order.index(c) < order.index(k) for c in children_of.get(k, [])), "stranded a cached block"
            assert not index.pinned.any()
        elif op == "finish" and live:
            rid = sorted(live)[int(rng.integers(len(live)))]
            req = live.pop(rid)
            extra = [_key8(-(n_op * 10 + j + 1)) for j in range(int(rng.integers(1, 3)))]  # decode blocks
            req.block_hashes = req.block_hashes + extra
            req.num_computed_tokens = req.num_tokens = len(req.block_hashes) * bs
            side.request_finished(req, list(range(len(req.block_hashes))))
        elif op == "lose" and len(index):
            resident = sorted(index.slot_of.values())
            side.update_connector_output(SimpleNamespace(kv_connector_worker_meta=SimpleNamespace(lost_slots={resident[int(rng.integers(len(resident)))]})))
        _links_exact(index)


@pytest.mark.parametrize("capacity", [24, 27, 48])
def test_scheduler_side_lru_hits_equal_the_replay_simulators(capacity):
    """The Mooncake test trace through the connector's scheduler side (bench connector --trace)
    and through kvstore's replay simulator, both LRU over the same capacity: the host tier's
    prefix hit ratio equals the simulator's, with and without eviction from prefix-tree leaves
    only. Two independent implementations of the same cache agree."""
    from pathlib import Path

    from kvstore._locate import import_bench
    from kvstore.evict.replay import ReplayConfig, replay
    from kvstore.evict.trace import load_mooncake

    trace = load_mooncake(Path(__file__).parents[1] / "evict" / "data" / "tiny_mooncake.jsonl")
    ours = import_bench("bench_connector").trace_hits(trace, "lru", capacity, leaves_only=False)
    sim = replay(trace, "lru", ReplayConfig(capacity_blocks=capacity))
    assert 0 < ours["prefix_hit_ratio"] == sim.prefix_hit_ratio < 1
    leaves = import_bench("bench_connector").trace_hits(trace, "lru", capacity, leaves_only=True)
    sim_leaves = replay(trace, "lru", ReplayConfig(capacity_blocks=capacity, leaves_only=True))
    assert 0 < leaves["prefix_hit_ratio"] == sim_leaves.prefix_hit_ratio < 1 and leaves["prefill_tflops"] > 0


def test_a_load_of_a_slot_whose_finished_save_is_in_flight_reads_the_saved_bytes(worker_streams, base_vllm_config):
    """The scheduler publishes a finished request's blocks when it plans their save, so the next
    step may load them while the save is still in flight: the load reads after the save landed
    (stream order), and get_finished reports the request once it has."""
    w = make_worker(base_vllm_config, {"host_blocks": 8, "policy": "lru"}, NUM_BLOCKS)
    caches = make_kv_caches(NUM_BLOCKS, seed=11)
    w.register_kv_caches(caches)
    original = {n: caches[n][[3, 8]].clone() for n in LAYERS}
    w.bind_connector_metadata(KVStoreConnectorMetadata(finished_saves={"a": BlockCopy.build([4, 6], [b"p", b"q"], [3, 8], 0, 1)}))
    w.start_load_kv(None)
    w.wait_for_save()
    first, _ = w.get_finished(set())
    w.clear_connector_metadata()
    w.bind_connector_metadata(KVStoreConnectorMetadata(loads={"b": BlockCopy.build([4, 6], [b"p", b"q"], [40, 41], 0, 1)}))
    w.start_load_kv(None)
    for n in LAYERS:
        w.wait_for_layer_load(n)
        assert torch.equal(caches[n][[40, 41]], original[n]), n
    w.wait_for_save()
    second, _ = w.get_finished(set())
    assert (first or set()) | (second or set()) == {"a"}
    assert w.get_block_ids_with_load_errors() == set()


@pytest.mark.parametrize("policy", ["lru", "asym"])
def test_a_host_tier_smaller_than_a_prompt_keeps_its_head_and_stops_saving(worker_streams, base_vllm_config, block_hasher, policy):
    """A 1,500-token prompt (93 host blocks, prefilled in 3 chunks) into a 64-block host tier:
    the tier keeps the prompt's first 64 blocks (its own saved head is never the victim of its
    tail), saves nothing during decode, and a second prompt sharing the first 1,440 tokens loads
    those 64 blocks."""
    host_blocks = 64
    eng = Engine(base_vllm_config, block_hasher, {"host_blocks": host_blocks, "policy": policy})
    prompt = _tokens(1500, 3)
    eng.add("a", prompt, max_tokens=6)
    steps = eng.run(12)
    saves = [len(m.saves) + sum(len(c) for c in m.finished_saves.values()) for _, m, _ in steps]
    chunks = -(-len(prompt) // base_vllm_config.scheduler_config.max_num_batched_tokens)  # prefill steps
    assert chunks > 1 and sum(saves) == host_blocks and not any(saves[chunks:]), saves  # saved once, nothing per decode step
    idx, side = eng.sched.connector.scheduler.index, eng.sched.connector.scheduler
    keys = side._keys(make_request("x", prompt, block_hasher))
    assert [k in idx.slot_of for k in keys] == [True] * host_blocks + [False] * (len(keys) - host_blocks)

    assert eng.sched.reset_prefix_cache()
    eng.add("b", prompt[:1440] + _tokens(60, 4))
    out, meta, kvo = eng.step()
    assert out.scheduled_new_reqs[0].num_computed_tokens == host_blocks * BLOCK
    assert len(meta.loads["b"]) == host_blocks and not kvo.invalid_block_ids
