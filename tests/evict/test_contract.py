"""The policy contract, checked by :func:`checked_victims` the same way for every policy:
a misbehaving policy (duplicate, protected, unknown victims, too many or too few) raises
PolicyError naming the bad id; a bad ``n`` raises ConfigError naming the value."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from kvstore.errors import ConfigError, PolicyError
from kvstore.evict import BlockInfo, make_policy
from kvstore.evict.base import POLICIES, EvictionPolicy, as_block_list, checked_victims
from kvstore.evict.cost import CostModel


class Scripted(EvictionPolicy):
    """Names whatever victims it is told to (a misbehaving policy)."""

    name = "scripted"

    def __init__(self, answer) -> None:
        super().__init__(None)
        self.answer = answer

    def on_insert(self, blocks) -> None:
        pass

    def on_access(self, blocks) -> None:
        pass

    def on_remove(self, blocks) -> None:
        pass

    def victims(self, n, protected=None):
        return np.asarray(self.answer, dtype=np.int64)

    def __len__(self) -> int:
        return 8


HELD = np.zeros(8, dtype=np.bool_)
HELD[[1, 2, 3, 5]] = True


@pytest.mark.parametrize(
    ("answer", "n", "protected", "words"),
    [
        ([3, 3], 2, None, "victim 3 twice"),
        ([2, 5], 2, np.array([5]), "protected victim 5"),
        ([1, 6], 2, None, "unknown victim 6"),
        ([-1], 1, None, "unknown victim -1"),
        ([1, 2, 3], 2, None, "named 3 victims for n=2"),
        ([1], 3, None, "named 1 victims for n=3 with 4 evictable"),
    ],
)
def test_misbehaving_policy_raises_policy_error_naming_the_id(answer, n, protected, words):
    with pytest.raises(PolicyError, match=words):
        checked_victims(Scripted(answer), n, protected, known=HELD)


def test_fewer_victims_than_n_pass_when_no_more_are_evictable():
    protected = np.array([1, 2])
    assert checked_victims(Scripted([3, 5]), 4, protected, known=HELD).tolist() == [3, 5]
    with pytest.raises(PolicyError, match="named 1 victims for n=4 with 2 evictable"):
        checked_victims(Scripted([3]), 4, protected, known=HELD)


def _info() -> BlockInfo:
    info = BlockInfo(16)
    info.position[:16] = np.arange(16) * 16
    info.num_tokens[:16] = 16
    info.size_bytes[:16] = 4096
    info.recompute_cost[:16] = CostModel.preset("tiny").recompute_flops(info.position[:16], 16)
    info.reload_cost[:16] = np.inf
    info.access_count[:16] = 1
    return info


ONLINE = sorted(name for name, cls in POLICIES.items() if not cls.offline)


@pytest.mark.parametrize("name", ONLINE)
@pytest.mark.parametrize("bad", [2.5, True, -1, "2", None])
def test_every_policy_refuses_a_bad_n_alike(name, bad):
    policy = make_policy(name, _info())
    policy.on_insert(np.arange(6))
    with pytest.raises(ConfigError, match="victims n must be a non-negative int"):
        checked_victims(policy, bad)
    assert len(policy) == 6


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("name", ONLINE)
def test_every_builtin_policy_keeps_the_contract(name, seed):
    """Seeded inserts, reads and evictions under random protection: every built-in policy's
    victims pass the checks, and it names as many as are evictable (S3-FIFO once stopped early
    when a block it promoted to M sat behind a run of protected ones)."""
    rng = np.random.default_rng(seed)
    info = _info()
    policy = make_policy(name, info)
    held = np.zeros(16, dtype=np.bool_)
    for _ in range(200):
        out = rng.permutation(np.flatnonzero(~held))[: int(rng.integers(0, 3))]
        if out.size:
            info.access_count[out] = 1
            policy.on_insert(out)
            held[out] = True
        some = np.flatnonzero(held)
        if some.size:
            reads = rng.choice(some, size=int(rng.integers(1, 6)))
            np.add.at(info.access_count, reads, 1)
            policy.on_access(reads)
            protected = rng.choice(some, size=int(rng.integers(0, some.size)), replace=False)
            got = checked_victims(policy, int(rng.integers(0, 6)), protected, known=held)
            policy.on_remove(got)
            held[got] = False
        assert len(policy) == int(held.sum())


def test_one_policy_instance_serves_one_owner():
    from kvstore.evict.replay import ReplayConfig, replay
    from kvstore.evict.trace import load_trace

    trace = load_trace(Path(__file__).parent / "data" / "tiny_mooncake.jsonl")
    policy = make_policy("lru")
    config = ReplayConfig(capacity_blocks=max(trace.max_request_blocks, 8))
    first = replay(trace, policy, config)
    assert first.device_hits > 0
    with pytest.raises(PolicyError, match="already tracks a tier"):
        replay(trace, policy, config)
    owner = object()
    fresh = make_policy("lru")
    fresh.bind(owner)
    fresh.bind(owner)  # the same owner again: fine
    with pytest.raises(PolicyError, match="give each store or replay its own instance"):
        fresh.bind(object())
    assert fresh._owner is owner


@pytest.mark.parametrize("name", ONLINE)
def test_every_policy_refuses_negative_and_unknown_ids_alike(name):
    """A negative id in on_insert is OutOfRangeError, an id not tracked (negative ones
    included) in on_access is BlockStateError; both name the id and change nothing."""
    from kvstore.errors import BlockStateError, OutOfRangeError

    policy = make_policy(name, _info())
    policy.on_insert([1, 2])
    with pytest.raises(OutOfRangeError, match="block id -1 is negative"):
        policy.on_insert([3, -1])
    for bad in ([-1], [2, 7]):
        with pytest.raises(BlockStateError, match=f"block {bad[-1]}, which this tier does not hold"):
            policy.on_access(bad)
    assert len(policy) == 2
    assert sorted(checked_victims(policy, 5, known=np.isin(np.arange(16), [1, 2])).tolist()) == [1, 2]


class Mine(EvictionPolicy):
    """A user's policy, written without any checks of its own: the base class checks ``n``."""

    def __init__(self, info=None) -> None:
        super().__init__(info)
        self.seen: list[int] = []

    def on_insert(self, blocks) -> None:
        self.seen += as_block_list(blocks)

    def on_access(self, blocks) -> None:
        pass

    def on_remove(self, blocks) -> None:
        pass

    def victims(self, n, protected=None):
        return np.asarray(self.seen[:n], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.seen)


def _any_policy(name: str) -> EvictionPolicy:
    """A fresh policy by name ("user": :class:`Mine`); offline ones prepared on a small trace."""
    if name == "user":
        return Mine()
    policy = make_policy(name, _info())
    if policy.offline:
        from kvstore.evict.trace import Trace

        policy.prepare(Trace.from_requests([list(range(16))]))
    return policy


@pytest.mark.parametrize("name", sorted(POLICIES) + ["user"])
@pytest.mark.parametrize("bad", [2.5, True, np.True_, -1, "2", None, np.float64(1.0)])
def test_a_bad_n_given_straight_to_any_policy_is_the_same_config_error(name, bad):
    """Not only through checked_victims: ``policy.victims(bad)`` itself, for every built-in
    policy (offline ones too) and for a policy a user writes without checks."""
    policy = _any_policy(name)
    policy.on_insert(np.arange(4))
    with pytest.raises(ConfigError, match=r"victims n must be a non-negative int, got "):
        policy.victims(bad)
    assert len(policy) == 4 and policy.victims(np.int64(4)).size == 4


@pytest.mark.parametrize("name", sorted(POLICIES) + ["user"])
def test_ids_that_are_not_int64_integers_are_refused_by_every_hook(name):
    """Floats, bools and strings are ShapeErrors naming the value (never truncated to an id);
    2**64 and a uint64 above 2**63 are OutOfRangeErrors naming it (never wrapped); the policy
    tracks what it tracked before."""
    from kvstore.errors import OutOfRangeError, ShapeError

    policy = _any_policy(name)
    policy.on_insert([1, 2])
    for hook in ("on_insert",) if name == "user" else ("on_insert", "on_access", "on_remove"):  # Mine ignores the others' ids
        for bad, error, shown in [([1.5], ShapeError, "1.5"), ([True], ShapeError, "True"), (["a"], ShapeError, "'a'"),
                                  (np.array([1.0]), ShapeError, "float64"), ([2**64], OutOfRangeError, str(2**64)),
                                  (np.array([2**63], dtype=np.uint64), OutOfRangeError, str(2**63))]:
            with pytest.raises(error, match=re.escape(shown)):
                getattr(policy, hook)(bad)
    assert len(policy) == 2


def test_a_policy_that_raises_is_a_policy_error_and_the_store_is_unchanged():
    """A bug inside a user's victims() reaches the caller as PolicyError (its exception the
    cause), raised before the store changes anything."""
    import torch

    from kvstore.spec import KVSpec
    from kvstore.store import KVStore

    class Broken(Mine):
        def victims(self, n, protected=None):
            raise RuntimeError("policy bug")

    spec = KVSpec(num_layers=1, num_kv_heads=1, num_q_heads=1, head_dim=64, block_size=4, dtype=torch.float32)
    store = KVStore(spec, device_blocks=2, host_blocks=4, device="cpu", device_policy=Broken())
    kv = torch.randn(1, 2, 12, 1, 64, generator=torch.Generator().manual_seed(3))
    s = store.create()
    store.append(s, kv[:, 0, :8], kv[:, 1, :8])
    before = (store.memory(), store.residency(store.block_table(s)).tolist())
    with pytest.raises(PolicyError, match=r"policy 'Broken' raised RuntimeError in victims\(1\): policy bug") as info:
        store.append(s, kv[:, 0, 8:], kv[:, 1, 8:])
    assert isinstance(info.value.__cause__, RuntimeError)
    assert (store.memory(), store.residency(store.block_table(s)).tolist()) == before and store.num_tokens(s) == 8
    store.check()
