"""The policy contract, checked by :func:`checked_victims` the same way for every policy:
a misbehaving policy (duplicate, protected, unknown victims, too many or too few) raises
PolicyError naming the bad id; a bad ``n`` raises ConfigError naming the value."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore.errors import ConfigError, PolicyError
from kvstore.evict import BlockInfo, make_policy
from kvstore.evict.base import POLICIES, EvictionPolicy, checked_victims
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


@pytest.mark.parametrize("name", ONLINE)
def test_every_builtin_policy_keeps_the_contract(name):
    """Seeded inserts, reads and evictions: every built-in policy's victims pass the checks."""
    rng = np.random.default_rng(7)
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
            reads = rng.choice(some, size=int(rng.integers(1, 4)))
            np.add.at(info.access_count, reads, 1)
            policy.on_access(reads)
            protected = rng.choice(some, size=int(rng.integers(0, some.size)), replace=False)
            got = checked_victims(policy, int(rng.integers(0, 4)), protected, known=held)
            policy.on_remove(got)
            held[got] = False
        assert len(policy) == int(held.sum())


def test_one_policy_instance_serves_one_owner():
    from kvstore.evict.replay import ReplayConfig, replay
    from kvstore.evict.trace import load_trace

    trace = load_trace("tests/evict/data/tiny_mooncake.jsonl")
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
