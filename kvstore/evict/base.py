"""The eviction-policy protocol, the block info a policy may read, and the policy registry.

A policy tracks the blocks resident in *one* tier and, when asked, names victims. It never
moves data: the store (or the replay simulator) calls

    on_insert(blocks)   blocks entered the tier
    on_access(blocks)   blocks were read (a hit), in access order: the last one is the most recent
    on_remove(blocks)   blocks left the tier (evicted, freed or dropped)
    victims(n, protected) -> up to n resident blocks to evict, best victim first

``victims`` only *names* blocks; the caller evicts them and then calls ``on_remove``.
Offline policies (``offline = True``, e.g. Belady) also get the whole trace through
:meth:`OfflinePolicy.prepare` before a replay; the store refuses them.
Block ids are non-negative ints; every method takes any 1-D integer sequence (list, tuple,
numpy array) and ``victims`` returns a 1-D int64 numpy array. ``protected`` may also be a 1-D
bool numpy array indexed by block id (``protected[b]``: ``b`` is protected; ids past its end
are not), so an owner that pins blocks keeps one mask current and passes it as is, without
building an id list per call; :func:`protected_ids` and :func:`protected_at` read either form.

What a policy may know about a block lives in :class:`BlockInfo`, a struct of arrays indexed
by block id that the owner keeps current and the policy only reads.

Writing a policy is one small class in one file::

    @register_policy("mru")
    class MRU(EvictionPolicy):
        ...
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from itertools import islice
from typing import Callable, Container, Iterable, TypeVar

import numpy as np

from kvstore import validate
from kvstore.errors import BlockStateError, ConfigError, KVStoreError, OutOfRangeError, PolicyError, ShapeError

__all__ = [
    "BlockInfo",
    "EvictionPolicy",
    "POLICIES",
    "register_policy",
    "make_policy",
    "as_block_array",
    "as_block_list",
    "first_unprotected",
    "checked_victims",
    "inserted_ids",
    "accessed_ids",
    "check_count",
    "leaf_victims",
    "PrefixTree",
    "protected_ids",
    "protected_at",
    "is_protection_mask",
    "OfflinePolicy",
]


def as_block_array(blocks: Iterable[int] | np.ndarray) -> np.ndarray:
    """``blocks`` as a 1-D int64 numpy array (no copy when it already is one). Anything else is
    checked by :func:`kvstore.validate.index_array`: integers only (a float, bool or string id
    is a ShapeError naming it, never truncated), and an id beyond int64 (``2**64``, a uint64
    above ``2**63``) an OutOfRangeError naming it, never wrapped. Negative ids pass here: what
    they mean is the hook's to say (``on_insert`` refuses them, ``on_remove`` ignores them)."""
    if type(blocks) is np.ndarray and blocks.dtype == np.int64 and blocks.ndim == 1:
        return blocks
    return validate.index_array(blocks, "block ids", lo=-(2**63), hi=2**63)


def as_block_list(blocks: Iterable[int] | np.ndarray) -> list[int]:
    """``blocks`` as a list of Python ints (what dict-based policies iterate over)."""
    if type(blocks) is np.ndarray and blocks.ndim == 1 and blocks.dtype == np.int64:
        return blocks.tolist()
    return as_block_array(blocks).tolist()


def inserted_ids(blocks, name: str) -> list[int]:
    """``blocks`` for ``on_insert``, as a list of Python ints; a negative id raises
    OutOfRangeError naming it (numpy would wrap it to a valid index). Every built-in policy
    checks before it changes anything."""
    ids = as_block_list(blocks)
    if ids and min(ids) < 0:
        raise OutOfRangeError(f"{name}: block id {min(ids)} is negative")
    return ids


def accessed_ids(blocks, resident, name: str) -> list[int]:
    """``blocks`` for ``on_access``, as a list of Python ints, all tracked: ``resident`` is the
    dict of tracked ids, or a tuple of dicts that together hold them. An id the policy does not
    track (negative ones included) raises BlockStateError naming it, before anything changes."""
    ids = as_block_list(blocks)
    parts = resident if isinstance(resident, tuple) else (resident,)
    if len(parts) == 1:
        ok = parts[0].keys() >= set(ids)
    else:
        ok = all(any(b in d for d in parts) for b in ids)
    if not ok:
        missing = next(b for b in ids if not any(b in d for d in parts))
        raise BlockStateError(f"{name}: on_access of block {missing}, which this tier does not hold")
    return ids


def is_protection_mask(protected) -> bool:
    """``protected`` is the bool-mask form (a 1-D bool numpy array indexed by block id)."""
    return isinstance(protected, np.ndarray) and protected.dtype == np.bool_


class _MaskIds:
    """The ids set in a bool mask over block ids, as a container (``b in``), without copying it:
    a byte view of the mask, indexed from Python in tens of nanoseconds (a numpy scalar lookup
    costs ten times that)."""

    __slots__ = ("_bytes", "_size")

    def __init__(self, mask: np.ndarray) -> None:
        self._bytes = memoryview(np.ascontiguousarray(mask).view(np.uint8))
        self._size = mask.size

    def __contains__(self, b: int) -> bool:
        return b < self._size and self._bytes[b] != 0


def protected_ids(protected) -> Container[int]:
    """``protected`` (None, block ids, or a bool mask over block ids) as a container of block ids:
    ``b in protected_ids(p)`` is True when ``b`` is protected. O(1) for a mask (a view),
    O(len) for ids (a set)."""
    if protected is None:
        return frozenset()
    if is_protection_mask(protected):
        return _MaskIds(protected)
    return set(as_block_list(protected))


def protected_at(blocks: np.ndarray, protected) -> np.ndarray:
    """Which of ``blocks`` (``[n]`` int64) are protected: ``[n]`` bool."""
    if protected is None:
        return np.zeros(blocks.size, dtype=np.bool_)
    if is_protection_mask(protected):
        inside = blocks < protected.size
        out = np.zeros(blocks.size, dtype=np.bool_)
        out[inside] = protected[blocks[inside]]
        return out
    ids = np.sort(as_block_array(protected))  # a binary search in the sorted ids: np.isin costs ~10x more per call
    if ids.size == 0:
        return np.zeros(blocks.size, dtype=np.bool_)
    at = np.searchsorted(ids, blocks)
    np.minimum(at, ids.size - 1, out=at)
    return ids[at] == blocks


def check_count(n, what: str = "victims n") -> int:
    """``n`` as a Python int: an int or numpy integer >= 0; bools, floats and the rest raise
    ConfigError naming the value (``victims(2.5)`` is refused the same way by every policy)."""
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise ConfigError(f"{what} must be a non-negative int, got {n!r} ({type(n).__name__})")
    if n < 0:
        raise ConfigError(f"{what} must be a non-negative int, got {int(n)}")
    return int(n)


#: up to this many victims, :func:`checked_victims` checks them with Python sets (numpy's
#: per-call overhead, ~10 us for unique/isin, dominates a replay that evicts a few blocks per
#: miss); above it, with sorted numpy arrays
_FEW_VICTIMS = 64


def _policy_name(policy: "EvictionPolicy") -> str:
    return getattr(policy, "name", None) or type(policy).__name__


def checked_victims(policy: "EvictionPolicy", n, protected=None, known=None, available: int | None = None) -> np.ndarray:
    """``policy.victims(n, protected)``, checked against the protocol; ``[<= n]`` int64.

    Raises PolicyError naming the policy and the bad id when the policy names more than ``n``
    victims, an id twice, a protected id, or an id the owner does not hold (``known``: a bool
    mask over block ids, or a callable mapping ``[k]`` int64 ids to ``[k]`` bool; negative ids
    are always unknown), or too few: fewer than ``min(n, available)``, where ``available`` is the
    number of unprotected blocks the tier holds (counted from ``known`` when it is a mask and
    not given; not checked when neither). Costs O(victims + protected ids) when the policy
    names ``n`` (a few victims: Python sets; many: one sort). ``n`` is checked by
    :func:`check_count` first. Nothing changes when it raises.
    """
    n = check_count(n)
    try:
        out = policy.victims(n, protected)
    except KVStoreError:
        raise
    except Exception as e:  # a policy's own bug: typed, and nothing has changed yet
        raise PolicyError(f"policy {_policy_name(policy)!r} raised {type(e).__name__} in victims({n}): {e}") from e
    if type(out) is not np.ndarray or out.ndim != 1 or out.dtype.kind not in "iu":
        if not (isinstance(out, np.ndarray) and out.ndim == 1 and np.issubdtype(out.dtype, np.integer)):
            raise PolicyError(f"policy {_policy_name(policy)!r} returned {type(out).__name__} victims, not a 1-D integer array")
    if out.dtype != np.int64:
        out = out.astype(np.int64)
    k = out.size
    if k > n:
        raise PolicyError(f"policy {_policy_name(policy)!r} named {k} victims for n={n}")
    if k:
        bad = _bad_few(out, protected) if k <= _FEW_VICTIMS else _bad_many(out, protected)
        if bad is not None:
            raise PolicyError(f"policy {_policy_name(policy)!r} named {bad}")
        if known is not None:
            held = known(out) if callable(known) else protected_at(out, known)
            if not held.all():
                raise PolicyError(f"policy {_policy_name(policy)!r} named unknown victim {int(out[~held][0])} (not in its tier)")
    if k < n:
        if available is None and is_protection_mask(known):
            free = known.copy()
            if protected is not None:
                free &= ~protected_at(np.arange(known.size, dtype=np.int64), protected)
            available = int(np.count_nonzero(free))
        if available is not None and k < min(n, available):
            raise PolicyError(f"policy {_policy_name(policy)!r} named {k} victims for n={n} with {available} evictable blocks")
    return out


def _bad_few(out: np.ndarray, protected) -> str | None:
    """What is wrong with a few victims ``out`` (negative, repeated or protected ids), or None."""
    ids = out.tolist()
    lo = min(ids)
    if lo < 0:
        return f"unknown victim {lo} (negative id)"
    if len(ids) > 1 and len(set(ids)) < len(ids):
        seen: set[int] = set()
        return f"victim {next(b for b in ids if b in seen or seen.add(b))} twice"
    if protected is not None:
        skip = protected_ids(protected)
        hit = next((b for b in ids if b in skip), None)
        if hit is not None:
            return f"protected victim {hit}"
    return None


def _bad_many(out: np.ndarray, protected) -> str | None:
    """:func:`_bad_few` for many victims, vectorised (one sort)."""
    if out.min() < 0:
        return f"unknown victim {int(out[out < 0][0])} (negative id)"
    order = np.sort(out)
    twice = order[1:][order[1:] == order[:-1]]
    if twice.size:
        return f"victim {int(twice[0])} twice"
    hit = protected_at(out, protected)
    if hit.any():
        return f"protected victim {int(out[hit][0])}"
    return None


def leaf_victims(
    policy: "EvictionPolicy", n: int, protected: np.ndarray, parent: np.ndarray, children: np.ndarray,
    take: Callable[[np.ndarray], None] | None = None,
) -> np.ndarray:
    """Up to ``n`` victims of ``policy`` among the leaves of a prefix tree, best first.

    A prefix cache (vLLM's, or a tier beneath it) loads a prefix only up to its first missing
    block, so it may evict only blocks that no resident block extends. ``parent[b]`` is the
    block ``b`` extends (-1: none), ``children[b]`` how many resident blocks extend ``b``,
    ``protected`` a bool mask of blocks that may not go. The victims come in rounds: each
    round asks ``policy.victims`` among the current unprotected leaves, and a block whose
    children all went is a leaf of the next round.

    ``take(got)``, when given, removes a round's victims before the next round (the owner's
    eviction: it tells the policy and decrements ``children`` in place). Without it nothing
    changes: the victims are only named (the rounds run on copies), for callers that must
    decide atomically.
    """
    if take is None:
        protected, children = protected.copy(), children.copy()
    rounds: list[np.ndarray] = []
    while n > 0:
        got = checked_victims(policy, n, protected | (children > 0))
        if got.size == 0:
            break
        rounds.append(got)
        n -= got.size
        if take is not None:
            take(got)
        else:
            protected[got] = True
            up = parent[got]
            np.subtract.at(children, up[up >= 0], 1)
    return np.concatenate(rounds) if rounds else np.zeros(0, dtype=np.int64)


class PrefixTree:
    """Which resident blocks extend which, over block ids ``0 .. capacity-1``: ``parent[b]`` is
    the resident block ``b`` extends (-1: none), ``children[b]`` how many resident blocks extend
    ``b`` (what :func:`leaf_victims` reads). Owners link blocks as they learn their parents and
    unlink them when they leave."""

    __slots__ = ("parent", "children")

    def __init__(self, capacity: int) -> None:
        self.parent = np.full(capacity, -1, dtype=np.int64)
        self.children = np.zeros(capacity, dtype=np.int64)

    def grow(self, capacity: int) -> None:
        """Room for block ids below ``capacity`` (never shrinks)."""
        extra = capacity - self.parent.size
        if extra > 0:
            self.parent = np.concatenate([self.parent, np.full(extra, -1, dtype=np.int64)])
            self.children = np.concatenate([self.children, np.zeros(extra, dtype=np.int64)])

    def link(self, blocks, parents) -> None:
        """``blocks[i]`` extends ``parents[i]`` (-1: nothing resident); a block already linked
        keeps its parent."""
        blocks, parents = as_block_array(blocks), as_block_array(parents)
        ok = (parents >= 0) & (self.parent[blocks] == -1)
        if ok.any():
            self.parent[blocks[ok]] = parents[ok]
            np.add.at(self.children, parents[ok], 1)

    def unlink(self, blocks) -> None:
        """``blocks`` left: their parents lose a child, and blocks that extended them (an inner
        block lost) now extend nothing resident."""
        blocks = as_block_array(blocks)
        up = self.parent[blocks]
        np.subtract.at(self.children, up[up >= 0], 1)
        self.parent[blocks] = -1
        if self.children[blocks].any():
            self.parent[np.isin(self.parent, blocks)] = -1
            self.children[blocks] = 0

    def victims(self, policy: "EvictionPolicy", n: int, protected: np.ndarray,
                take: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
        """:func:`leaf_victims` over this tree (``take`` must :meth:`unlink` what it removes)."""
        return leaf_victims(policy, n, protected, self.parent, self.children, take)


def first_unprotected(order: Iterable[int], n: int, protected=None) -> np.ndarray:
    """The first ``n`` ids of ``order`` not in ``protected``: ``[<= n]`` int64 (the victims of
    a policy that keeps its blocks in eviction order, e.g. LRU's or FIFO's queue).

    Reads ``order`` only up to the n-th unprotected id (protected blocks, just read, tend to be
    at the back of a recency order): one by one against a set built from protected ids, or in
    chunks of doubling size against a protection mask.
    """
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    if protected is None:
        return np.fromiter(islice(order, n), dtype=np.int64)
    if not is_protection_mask(protected):
        skip = protected_ids(protected)
        return np.fromiter(islice((b for b in order if b not in skip), n), dtype=np.int64)
    it, found, want, chunk = iter(order), [], n, n
    while want > 0:
        ids = np.fromiter(islice(it, chunk), dtype=np.int64)
        free = ids[~protected_at(ids, protected)][:want]
        found.append(free)
        want -= free.size
        if ids.size < chunk:
            break
        chunk *= 2
    return np.concatenate(found)


class BlockInfo:
    """Per-block facts a policy may read: a struct of arrays indexed by block id.

    The store or the simulator owns it, grows it as block ids appear, and keeps it current;
    policies hold a reference to this object (not to its arrays, which are replaced on
    growth) and never write to it.

    Arrays (all of length :attr:`capacity`):
        seq:            owning sequence id (the request / prefix-tree root), -1 if unused
        position:       first token position of the block within its sequence
        num_tokens:     tokens the block holds
        size_bytes:     bytes of the block (all layers, K and V)
        tier:           where the block is now (see ``TIER_*``; the fastest copy)
        last_access:    logical time of the last access (the owner's clock)
        access_count:   accesses since insertion into any tier
        recompute_cost: FLOPs to recompute the block's KV alone at its position
        reload_cost:    seconds to copy the block back from the next tier down
        parent:         the block this one extends in the prefix tree (-1: a sequence's first)
        fanout:         distinct blocks that have extended this one so far (its children)
        reads:          reads over the block's whole life (``access_count`` restarts in each tier)
    """

    TIER_DEVICE = 0
    TIER_HOST = 1
    TIER_COLD = 2
    TIER_NONE = 3

    _FIELDS: dict[str, tuple[type, float]] = {
        "seq": (np.int64, -1),
        "position": (np.int64, 0),
        "num_tokens": (np.int32, 0),
        "size_bytes": (np.int64, 0),
        "tier": (np.int8, 3),
        "last_access": (np.int64, 0),
        "access_count": (np.int64, 0),
        "recompute_cost": (np.float64, 0.0),
        "reload_cost": (np.float64, 0.0),
        "parent": (np.int64, -1),
        "fanout": (np.int32, 0),
        "reads": (np.int64, 0),
    }

    seq: np.ndarray
    position: np.ndarray
    num_tokens: np.ndarray
    size_bytes: np.ndarray
    tier: np.ndarray
    last_access: np.ndarray
    access_count: np.ndarray
    recompute_cost: np.ndarray
    reload_cost: np.ndarray
    parent: np.ndarray
    fanout: np.ndarray
    reads: np.ndarray

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = 0
        for name, (dtype, fill) in self._FIELDS.items():
            setattr(self, name, np.full(0, fill, dtype=dtype))
        self.reserve(capacity)

    def reserve(self, capacity: int) -> None:
        """Grow every array to at least ``capacity`` entries (amortised doubling); ``capacity``
        is a block count (:func:`kvstore.validate.tier_blocks`)."""
        capacity = validate.tier_blocks(capacity, "BlockInfo capacity")
        if capacity <= self.capacity:
            return
        new_cap = max(capacity, 2 * self.capacity, 16)
        for name, (dtype, fill) in self._FIELDS.items():
            old = getattr(self, name)
            new = np.full(new_cap, fill, dtype=dtype)
            new[: old.shape[0]] = old
            setattr(self, name, new)
        self.capacity = new_cap

    def reset(self, blocks: np.ndarray) -> None:
        """Return ``blocks`` to the unused state."""
        for name, (_, fill) in self._FIELDS.items():
            getattr(self, name)[blocks] = fill

    def link(self, blocks, parents) -> None:
        """New ``blocks`` extend ``parents`` (``[n]`` each, -1: a sequence's first block): sets their
        ``parent``, starts their ``fanout`` and ``reads`` at 0 and adds one to each parent's fanout.
        Ids out of ``[0, capacity)`` (parents: ``[-1, capacity)``) and unequal lengths raise
        before anything changes."""
        blocks = validate.index_array(blocks, "BlockInfo.link: blocks", lo=0, hi=self.capacity)
        parents = validate.index_array(parents, "BlockInfo.link: parents", lo=-1, hi=self.capacity)
        if blocks.size != parents.size:
            raise ShapeError(f"BlockInfo.link: {blocks.size} blocks but {parents.size} parents")
        self.parent[blocks] = parents
        self.fanout[blocks] = 0
        self.reads[blocks] = 0
        up = parents[parents >= 0]
        if up.size:
            np.add.at(self.fanout, up, 1)


class EvictionPolicy(ABC):
    """Tracks the blocks resident in one tier and names victims. See the module docstring.

    Args:
        info: the block facts this policy may read (recompute cost, position, ...). Policies
            that need none (LRU, FIFO, ...) accept ``None``.
    """

    #: registry name, set by :func:`register_policy`
    name: str = ""
    #: True for policies that need the future (Belady); the store refuses them
    offline: bool = False

    def __init__(self, info: BlockInfo | None = None) -> None:
        self.info = info

    def __init_subclass__(cls, **kwargs) -> None:
        """A policy's own ``victims`` gets ``n`` through :func:`check_count`, so ``victims(2.5)``,
        ``victims(-1)`` and ``victims(True)`` raise the same ConfigError for every policy,
        built-in or written by a user, before the policy's code runs."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("victims")
        if own is None or getattr(own, "__isabstractmethod__", False):
            return

        @functools.wraps(own)
        def victims(self, n, protected=None):
            return own(self, check_count(n), protected)

        cls.victims = victims

    @abstractmethod
    def on_insert(self, blocks) -> None:
        """``blocks`` entered this tier (they are not resident before the call)."""

    @abstractmethod
    def on_access(self, blocks) -> None:
        """Resident ``blocks`` were accessed, in order (the last is the most recent)."""

    @abstractmethod
    def on_remove(self, blocks) -> None:
        """Resident ``blocks`` left this tier."""

    @abstractmethod
    def victims(self, n: int, protected=None) -> np.ndarray:
        """Up to ``n`` resident blocks to evict, best victim first, none of them protected
        (``protected``: None, block ids, or a bool mask over block ids; see the module docstring).

        Returns fewer than ``n`` only when fewer unprotected blocks are resident. Does not
        change which blocks the policy tracks: the caller calls :meth:`on_remove` for what it
        evicts. Policies with lazy bookkeeping (S3-FIFO's promotions, a heap's stale entries)
        may do that work here; naming victims twice without removing them is always valid.
        """

    def __len__(self) -> int:
        """Number of resident blocks tracked."""
        raise NotImplementedError

    def bind(self, owner: object) -> None:
        """Claim this policy for ``owner`` (a store's tier, a replay): a policy tracks one tier,
        so a second owner raises PolicyError and changes nothing; binding the same owner again
        is a no-op. Owners call it before the first ``on_insert``."""
        bound = getattr(self, "_owner", None)  # a user policy may skip EvictionPolicy.__init__
        if bound is not None and bound is not owner:
            raise PolicyError(
                f"policy {self.name or type(self).__name__!r} already tracks a tier of {type(bound).__name__}; "
                f"give each store or replay its own instance"
            )
        self._owner = owner


class OfflinePolicy(EvictionPolicy):
    """A policy that needs the future: the replay simulator calls :meth:`prepare` once, before
    the first request, and keeps ``info.last_access[b]`` equal to the index (into
    ``trace.blocks``) of the read being served, so the policy can look up that read's future."""

    offline = True

    @abstractmethod
    def prepare(self, trace) -> None:
        """Receive the whole trace (a :class:`kvstore.evict.trace.Trace`) before replay."""


P = TypeVar("P", bound=type[EvictionPolicy])

#: name -> policy class. Built-ins register themselves on ``import kvstore.evict``.
POLICIES: dict[str, type[EvictionPolicy]] = {}


def register_policy(name: str) -> Callable[[P], P]:
    """Class decorator: make a policy available by ``name`` to the store, simulator and CLI."""

    def deco(cls: P) -> P:
        if name in POLICIES and POLICIES[name] is not cls:
            raise ConfigError(f"eviction policy name {name!r} is already registered to {POLICIES[name].__name__}")
        cls.name = name
        POLICIES[name] = cls
        return cls

    return deco


def make_policy(policy: str | EvictionPolicy, info: BlockInfo | None = None, **kwargs) -> EvictionPolicy:
    """A policy instance from a registered name (constructed with ``info`` and ``kwargs``) or
    an instance (returned as is, bound to ``info`` if it has none)."""
    if isinstance(policy, EvictionPolicy):
        if policy.info is None:
            policy.info = info
        return policy
    try:
        cls = POLICIES[policy]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown eviction policy {validate.show(policy)}; registered: {sorted(POLICIES)}") from None
    try:
        return cls(info, **kwargs)
    except TypeError as e:  # an unknown or missing keyword
        raise ConfigError(f"eviction policy {policy!r}: {e}") from None
