"""Trace replay: request-order simulation of a device tier and an optional host tier.

Each request reads its blocks in prompt order. A block resident on the device is a device
hit; one on the host is a host hit (loaded: it moves to the device, its bytes cross the
link); any other block is a miss (recomputed, then inserted on the device). Tiers are
exclusive: device victims move to the host tier (when there is one), host victims are
dropped. The blocks a request has read so far are protected from eviction (they are in use
until it is prefilled), so the device tier must hold the longest request; blocks it reads
later are not, and one evicted before its read is a miss, exactly as in a per-block cache.

The policies see one call per *run* of consecutive hits or misses, in order, so LRU replays
exactly as libCacheSim's LRU does on the flattened block stream (same hits, block for
block). The cache's evolution does not depend on the recovery semantics, only what a miss
costs does, so one replay yields both:

``multi-segment`` (AsymCache): each missing block is computed alone at its own position,
    ``recompute_flops(position, num_tokens)`` FLOPs.
``prefix`` (vLLM): a miss at block ``i`` invalidates blocks ``i+1 ..`` too: everything from
    the first miss on is computed and only host hits before it are loaded.

*Prefill* FLOPs count every block computed; *recompute* FLOPs count only blocks computed
again (not their first read, a compulsory miss no cache avoids), so a policy's recompute is
what its evictions cost: Belady with room for the working set recomputes nothing.

The estimated TTFT of a request is its prefill FLOPs over ``cost.compute_throughput`` plus
the ``reload_cost`` (latency + bytes / ``cost.reload_bandwidth``) of every block it loads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from kvstore import validate
from kvstore.errors import CapacityError, ConfigError
from kvstore.evict.base import BlockInfo, EvictionPolicy, checked_victims, leaf_victims, make_policy
from kvstore.evict.cost import CostModel
from kvstore.evict.trace import Trace
from kvstore.spec import KVSpec

__all__ = ["ReplayConfig", "ReplayResult", "SemanticsCost", "SEMANTICS", "replay", "block_info", "prefix_parents"]

#: recovery semantics, in the order they are reported
SEMANTICS = ("multi-segment", "prefix")

DEVICE, HOST, NONE = BlockInfo.TIER_DEVICE, BlockInfo.TIER_HOST, BlockInfo.TIER_NONE


@dataclass(frozen=True, kw_only=True)
class ReplayConfig:
    """One replay's tiers and costs.

    Attributes:
        capacity_blocks: device tier capacity in trace blocks (>= the longest request).
        host_blocks: host tier capacity in trace blocks (0: no host tier).
        host_policy: the host tier's policy (a registered name).
        model: KVSpec / CostModel preset giving bytes per token and recompute FLOPs.
        cost: the cost model (default: ``CostModel.preset(model)``); its ``compute_throughput``
            and ``reload_bandwidth`` also set the TTFT estimate.
        leaves_only: the device tier evicts only blocks that no resident block extends (block
            ``i`` of a request extends block ``i - 1``), as vLLM's prefix caches and kvstore's
            connector do: no resident block is ever cut off from its prefix, so a prefix lookup
            reads every resident block. Victims are taken leaf by leaf in rounds (a block whose
            children all went is a leaf of the next round). Device tier only (no host tier).
    """

    capacity_blocks: int
    host_blocks: int = 0
    host_policy: str = "lru"
    model: str = "llama3-8b"
    cost: CostModel | None = None
    leaves_only: bool = False

    def __post_init__(self) -> None:
        for name, lo in (("capacity_blocks", 1), ("host_blocks", 0)):  # frozen: the checked ints are set directly
            object.__setattr__(self, name, validate.tier_blocks(getattr(self, name), f"ReplayConfig.{name}", lo=lo))
        if not isinstance(self.host_policy, str):
            raise ConfigError(f"ReplayConfig.host_policy must be a policy name, got {validate.show(self.host_policy)}")
        if not isinstance(self.model, str):
            raise ConfigError(f"ReplayConfig.model must be a preset name, got {validate.show(self.model)}")
        if self.cost is not None and not isinstance(self.cost, CostModel):
            raise ConfigError(f"ReplayConfig.cost must be a CostModel or None, got {validate.show(self.cost)}")
        KVSpec.preset(self.model)  # raises ConfigError naming the known presets
        if not isinstance(self.leaves_only, bool):
            raise ConfigError(f"ReplayConfig.leaves_only must be a bool, got {self.leaves_only!r}")
        if self.leaves_only and self.host_blocks:
            raise ConfigError(f"ReplayConfig.leaves_only supports the device tier only, got host_blocks={self.host_blocks}")
        if self.cost is None:
            object.__setattr__(self, "cost", CostModel.preset(self.model))


@dataclass(frozen=True, kw_only=True)
class SemanticsCost:
    """What the misses of a replay cost under one recovery semantics.

    Attributes:
        recompute_flops: FLOPs spent computing blocks again (first reads excluded).
        prefill_flops: FLOPs spent computing blocks (first reads included).
        bytes_loaded: bytes loaded from the host tier.
        ttft_s: ``[num_requests]`` estimated time to first token of each request (seconds).
    """

    recompute_flops: float
    prefill_flops: float
    bytes_loaded: int
    ttft_s: np.ndarray = field(repr=False)

    @property
    def mean_ttft_ms(self) -> float:
        return float(self.ttft_s.mean() * 1e3) if self.ttft_s.size else 0.0

    @property
    def p99_ttft_ms(self) -> float:
        return float(np.percentile(self.ttft_s, 99) * 1e3) if self.ttft_s.size else 0.0


@dataclass(frozen=True, kw_only=True)
class ReplayResult:
    """Counts and costs of one replay (hits counted per block read, as libCacheSim counts)."""

    policy: str
    capacity_blocks: int
    host_blocks: int
    num_requests: int
    num_block_requests: int
    device_hits: int
    host_hits: int
    prefix_hits: int
    costs: dict[str, SemanticsCost]
    sim_seconds: float

    @property
    def hits(self) -> int:
        """Reads that found the block resident in some tier."""
        return self.device_hits + self.host_hits

    @property
    def block_hit_ratio(self) -> float:
        return self.hits / max(self.num_block_requests, 1)

    @property
    def prefix_hit_ratio(self) -> float:
        """Fraction of reads in the leading resident run of their request (what vLLM reuses)."""
        return self.prefix_hits / max(self.num_block_requests, 1)

    @property
    def host_hit_ratio(self) -> float:
        return self.host_hits / max(self.num_block_requests, 1)

    @property
    def sim_requests_per_s(self) -> float:
        return self.num_requests / self.sim_seconds if self.sim_seconds > 0 else float("inf")

    @property
    def block_requests_per_s(self) -> float:
        return self.num_block_requests / self.sim_seconds if self.sim_seconds > 0 else float("inf")

    def row(self, semantics: str = "multi-segment") -> dict:
        """The JSON row of ``kvstore replay``: the issue's keys first, then the extras."""
        try:
            c = self.costs[semantics]
        except KeyError:
            raise ConfigError(f"unknown semantics {semantics!r}; known: {list(SEMANTICS)}") from None
        return {
            "policy": self.policy,
            "capacity_blocks": int(self.capacity_blocks),
            "host_blocks": int(self.host_blocks),
            "block_hit_ratio": self.block_hit_ratio,
            "prefix_hit_ratio": self.prefix_hit_ratio,
            "recompute_tflops": c.recompute_flops / 1e12,
            "bytes_loaded": int(c.bytes_loaded),
            "mean_ttft_ms": c.mean_ttft_ms,
            "p99_ttft_ms": c.p99_ttft_ms,
            "sim_requests_per_s": self.sim_requests_per_s,
            "semantics": semantics,
            "host_hit_ratio": self.host_hit_ratio,
            **{f"recompute_tflops_{s.replace('-', '_')}": self.costs[s].recompute_flops / 1e12 for s in SEMANTICS},
            "prefill_tflops": c.prefill_flops / 1e12,
            "block_requests_per_s": self.block_requests_per_s,
        }


def prefix_parents(trace: Trace) -> np.ndarray:
    """``[num_unique_blocks]`` the block each block extends in the request that first reads it
    (its predecessor there), -1 for a request's first block."""
    prev = np.full_like(trace.blocks, -1)
    prev[1:] = trace.blocks[:-1]
    prev[trace.offsets[:-1][np.diff(trace.offsets) > 0]] = -1  # each request's first read
    return prev[trace.first_read]


def block_info(trace: Trace, config: ReplayConfig) -> BlockInfo:
    """The BlockInfo of a trace's blocks: owner = first request, position, tokens, bytes and
    both costs filled (``reload_cost`` is inf without a host tier: nothing to reload from);
    every block off all tiers."""
    spec = KVSpec.preset(config.model)
    info = BlockInfo(trace.num_unique_blocks)
    u = trace.num_unique_blocks
    info.seq[:u] = trace.first_request
    info.position[:u] = trace.position
    info.num_tokens[:u] = trace.num_tokens
    info.size_bytes[:u] = trace.num_tokens.astype(np.int64) * spec.bytes_per_token
    info.recompute_cost[:u] = config.cost.recompute_flops(trace.position, trace.num_tokens)
    info.reload_cost[:u] = config.cost.reload_seconds(info.size_bytes[:u]) if config.host_blocks else np.inf
    info.parent[:u] = prefix_parents(trace)
    return info


class _Tiers:
    """The replay loop's state: per-block tier (in ``info.tier``), the policies, fill counts."""

    def __init__(self, info: BlockInfo, device: EvictionPolicy, host: EvictionPolicy | None,
                 config: ReplayConfig, parent: np.ndarray | None = None) -> None:
        self.info = info
        self.tier = info.tier
        self.device, self.host = device, host
        self.dev_free = config.capacity_blocks
        self.host_free = config.host_blocks
        # leaves_only: parent[b] = the block b extends (-1: none); children[b] = resident blocks extending b
        self.parent = parent
        self.children = np.zeros(info.capacity, dtype=np.int64) if parent is not None else None

    def _on_device(self, ids: np.ndarray) -> np.ndarray:
        return self.tier[ids] == DEVICE

    def _on_host(self, ids: np.ndarray) -> np.ndarray:
        return self.tier[ids] == HOST

    def _device_victims(self, need: int, protected: np.ndarray) -> np.ndarray:
        """``need`` device victims, none of ``protected``; with leaves_only, leaves only, in rounds
        (each round's victims leave the tier before the next round is asked)."""
        if self.parent is None:
            victims = checked_victims(self.device, need, protected, known=self._on_device)
            self.device.on_remove(victims)
            return victims
        mask = np.zeros(self.children.size, dtype=np.bool_)
        mask[protected] = True

        def take(got: np.ndarray) -> None:
            self.device.on_remove(got)
            up = self.parent[got]
            np.subtract.at(self.children, up[up >= 0], 1)

        return leaf_victims(self.device, need, mask, self.parent, self.children, take)

    def admit(self, blocks: np.ndarray, protected: np.ndarray) -> bool:
        """Bring non-resident or host-resident ``blocks`` onto the device, evicting (none of
        ``protected``) as needed; True when something was evicted or dropped."""
        tier, host = self.tier, self.host
        if host is not None:
            loaded = blocks[tier[blocks] == HOST]
            if loaded.size:
                host.on_remove(loaded)
                self.host_free += loaded.size
        need = blocks.size - self.dev_free
        if need > 0:
            victims = self._device_victims(need, protected)
            if victims.size != need:
                raise CapacityError(
                    f"device policy {self.device.name!r} named {victims.size} victims, {need} needed "
                    f"({blocks.size} blocks to insert, {protected.size} protected)"
                )
            self.dev_free += need
            if host is None:
                self._drop(victims)
            else:
                self._demote(victims, protected)
        tier[blocks] = DEVICE
        self.dev_free -= blocks.size
        if self.parent is not None:
            up = self.parent[blocks]
            np.add.at(self.children, up[up >= 0], 1)
        self.device.on_insert(blocks)
        return need > 0

    def _demote(self, victims: np.ndarray, protected: np.ndarray) -> None:
        """Move device ``victims`` (best victim first) to the host tier, dropping host victims."""
        need = victims.size - self.host_free
        if need > 0:
            dropped = checked_victims(self.host, need, protected, known=self._on_host)
            self.host.on_remove(dropped)
            self.host_free += dropped.size
            self._drop(dropped)
            if dropped.size < need:  # the host cannot make room: the worst device victims go
                self._drop(victims[: need - dropped.size])
                victims = victims[need - dropped.size :]
        self.tier[victims] = HOST
        self.host_free -= victims.size
        self.host.on_insert(victims)

    def _drop(self, blocks: np.ndarray) -> None:
        self.tier[blocks] = NONE
        self.info.access_count[blocks] = 0


def replay(trace: Trace, policy: str | EvictionPolicy, config: ReplayConfig, *,
           policy_kwargs: dict | None = None, progress: bool = False) -> ReplayResult:
    """Replay ``trace`` through a device tier run by ``policy`` (a registered name or an
    unbound instance) and, when ``config.host_blocks`` > 0, a host tier. ``progress``: a tqdm
    bar on stderr that names the policy and the capacities.

    The logical clock is the index of the read in ``trace.blocks``: serving read ``i`` of block
    ``b`` sets ``info.last_access[b] = i`` and increments ``info.access_count[b]`` and
    ``info.reads[b]`` before the policies hear of it; a block's first read adds one to its
    parent's ``info.fanout``. Offline policies get ``prepare(trace)`` first.
    """
    if not isinstance(trace, Trace):
        raise ConfigError(f"replay: trace must be a Trace (kvstore.evict.trace.load_trace), got {validate.show(trace)}")
    if not isinstance(config, ReplayConfig):
        raise ConfigError(f"replay: config must be a ReplayConfig, got {validate.show(config)}")
    policy_kwargs = validate.mapping(policy_kwargs, "replay: policy_kwargs")
    if trace.num_requests == 0:
        raise ConfigError(f"replay: the trace {trace.source} holds no requests, there is nothing to replay")
    if config.capacity_blocks < trace.max_request_blocks:
        raise ConfigError(
            f"capacity_blocks={config.capacity_blocks} cannot hold the longest request "
            f"({trace.max_request_blocks} blocks) of {trace.source}"
        )
    t0 = time.perf_counter()
    info = block_info(trace, config)
    if isinstance(policy, EvictionPolicy):
        policy.bind(info)  # this replay's BlockInfo is its owner: a second replay of the instance is refused
    device = make_policy(policy, info, **policy_kwargs)
    device.bind(info)
    host = make_policy(config.host_policy, info) if config.host_blocks else None
    if host is not None and host.offline:
        raise ConfigError(f"host_policy={config.host_policy!r} is offline; use an online policy for the host tier")
    for p in (device, host):
        if p is not None and p.offline:
            p.prepare(trace)
    tiers = _Tiers(info, device, host, config, prefix_parents(trace) if config.leaves_only else None)
    name = device.name or type(device).__name__
    label = f"replay {name} @ {config.capacity_blocks} blocks" + (f", host {config.host_blocks}" if config.host_blocks else "")
    status = _run(trace, tiers, progress, label)
    return _account(trace, info, config, status, name, time.perf_counter() - t0)


def _run(trace: Trace, tiers: _Tiers, progress: bool, label: str) -> np.ndarray:
    """The request loop: ``[num_block_requests]`` int8 tier of each block when it was read
    (``label`` names the run on the progress bar)."""
    from tqdm import tqdm

    blocks, offsets = trace.blocks, trace.offsets.tolist()
    clock = np.arange(trace.num_block_requests, dtype=np.int64)
    status = np.empty(trace.num_block_requests, dtype=np.int8)
    info = tiers.info
    tier, last_access, access_count, reads, fanout = info.tier, info.last_access, info.access_count, info.reads, info.fanout
    # a block's first read makes it a child of the block before it (its parent): fanout grows then
    extends = np.zeros(trace.num_block_requests, dtype=np.bool_)
    extends[trace.first_read] = info.parent[: trace.num_unique_blocks] >= 0
    on_access, admit = tiers.device.on_access, tiers.admit
    flatnonzero = np.flatnonzero
    bar = tqdm(total=trace.num_requests, desc=label, disable=not progress, unit="req", mininterval=0.5, leave=False)
    step = 512
    for r in range(trace.num_requests):
        o0, o1 = offsets[r], offsets[r + 1]
        if r % step == 0:
            bar.update(min(step, trace.num_requests - r))
        if o0 == o1:
            continue
        h = blocks[o0:o1]
        last_access[h] = clock[o0:o1]
        access_count[h] += 1
        reads[h] += 1
        new = extends[o0:o1]
        if new.any():
            np.add.at(fanout, info.parent[h[new]], 1)
        pos = 0
        while pos < h.size:  # one pass per snapshot of the request's tiers (see the docstring)
            st = tier[h[pos:]]
            status[o0 + pos : o1] = st
            miss = st != DEVICE
            if not miss.any():
                on_access(h[pos:] if pos else h)
                break
            bounds = (flatnonzero(miss[1:] != miss[:-1]) + pos + 1).tolist()
            bounds.append(h.size)
            start, is_miss = pos, bool(miss[0])
            for end in bounds:
                if not is_miss:
                    on_access(h[start:end])
                elif admit(h[start:end], h[:end]) and end < h.size:
                    break  # evictions may have taken blocks this request reads next
                start, is_miss = end, not is_miss
            pos = end
    bar.close()
    return status


def _account(trace: Trace, info: BlockInfo, config: ReplayConfig, status: np.ndarray, name: str,
             loop_seconds: float) -> ReplayResult:
    """Hit counts and both semantics' costs from the tier each read found its block in."""
    t0 = time.perf_counter()
    n_req, blocks, offsets = trace.num_requests, trace.blocks, trace.offsets
    req_of = trace.request_of_block_request()
    within = np.arange(blocks.size, dtype=np.int64) - offsets[:-1][req_of]
    miss, on_host = status == NONE, status == HOST
    lengths = np.diff(offsets)

    # First miss of each request (its length when it has none).
    first_miss = lengths.copy()
    miss_at = np.flatnonzero(miss)
    reqs, first = np.unique(req_of[miss_at], return_index=True)
    first_miss[reqs] = within[miss_at[first]]
    before_miss = within < first_miss[req_of]

    again = ~trace.is_first_read()
    flops = info.recompute_cost[blocks]
    reload_s = info.reload_cost[blocks]
    size = info.size_bytes[blocks]
    tput = config.cost.compute_throughput
    costs = {}
    for semantics, computed, load in (
        ("multi-segment", miss, on_host),
        ("prefix", ~before_miss, on_host & before_miss),
    ):
        req_flops = np.bincount(req_of, weights=np.where(computed, flops, 0.0), minlength=n_req)
        req_load = np.bincount(req_of, weights=np.where(load, reload_s, 0.0), minlength=n_req)
        costs[semantics] = SemanticsCost(
            recompute_flops=float(flops[computed & again].sum()),
            prefill_flops=float(req_flops.sum()),
            bytes_loaded=int(size[load].sum()),
            ttft_s=req_flops / tput + req_load,
        )
    return ReplayResult(
        policy=name,
        capacity_blocks=config.capacity_blocks,
        host_blocks=config.host_blocks,
        num_requests=n_req,
        num_block_requests=int(blocks.size),
        device_hits=int((status == DEVICE).sum()),
        host_hits=int(on_host.sum()),
        prefix_hits=int(first_miss.sum()),
        costs=costs,
        sim_seconds=loop_seconds + time.perf_counter() - t0,
    )
