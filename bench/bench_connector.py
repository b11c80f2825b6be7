"""vLLM connector: scheduler-side overhead per request per step, and host-tier save/load bandwidth.

Scheduler side: a host tier holding ``--cached-blocks`` blocks (keys as vLLM's 32-byte hashes);
``--requests`` requests decode (build_connector_meta per step) and as many are admitted with a
``--hit-blocks``-block prefix hit (get_num_new_matched_tokens + update_state_after_alloc). The
vLLM objects those methods read (Request, KVCacheBlocks, SchedulerOutput) are stand-ins with
the same attributes, so the figure is the connector's own cost. Full-tier admission: the host
tier holds exactly its capacity; each admitted request looks up its prefix, plans its loads
(pinning its hits) and, once scheduled (build_connector_meta), saves its blocks not in the
tier: its 4 new blocks plus any prefix blocks evicted since. The step's saves go into the tier
in one insert that evicts as many victims while up to ``--requests x --hit-blocks`` slots are
pinned by the step's loads. That is the steady state of a serving host tier, where every
step's admissions evict. Worker side: save
then load of ``--copy-blocks`` vLLM blocks between per-layer KV caches in vLLM's layout and the host pool,
against a plain ``copy_`` of the same bytes.

Hit rate (``--trace PATH``): a Mooncake trace replayed through the scheduler side, one request
per step with no GPU prefix cache above the host tier, for each of ``--trace-policies`` with
and without ``leaves_only``: the host tier's prefix hit ratio and the prefill FLOPs left to
compute (what vLLM recomputes from each request's first missing block on).

Remote tier (``--remote redis://host:port``): save and load GB/s of ``--copy-blocks`` llama3-8b
blocks (``--layers`` layers) against that server through kvstore's remote tier (LMCache's
RedisConnector; the figures include the header and CRC-32 of every value), the latency of one
hit and of a lookup; with ``--trace``, two engines behind a round-robin balancer replay the
trace each alone and sharing the remote tier (see :func:`trace_hits`).
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from types import SimpleNamespace

from kvstore.errors import ConfigError

from .common import (
    Progress, add_common_args, fraction_or_count, machine_info, names, parse_capacities, positive_int, print_table, resolve_device,
    time_fn, write_json,
)


def _online_policies() -> list[str]:
    """The policies the connector's host tier takes: every registered policy that is not
    offline (belady needs the future)."""
    from kvstore.evict import POLICIES

    return sorted(name for name, cls in POLICIES.items() if not cls.offline)


def _policy(text: str) -> str:
    """One online policy name."""
    if "," in text:
        raise argparse.ArgumentTypeError(f"expected one policy, got {text!r}")
    return names(_online_policies)(text)[0]


def _trace_file(text: str) -> str:
    """An existing, readable trace file."""
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no trace file at {text!r}")
    return text


def _remote_url(text: str) -> str:
    """A Redis-protocol server URL (checked as cold_tier.remote_url is) at which a server accepts
    connections now: an unreachable one is refused before any work, not after the other benches."""
    import socket
    from urllib.parse import urlsplit

    from kvstore.integrations.lmcache import ColdTierConfig

    try:
        ColdTierConfig(remote_url=text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    url = urlsplit(text)
    try:
        socket.create_connection((url.hostname, url.port or 6379), timeout=5.0).close()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"no server accepts connections at {text!r} ({e.strerror or e})") from None
    return text


def add_cli_args(parser) -> None:
    parser.add_argument("--cached-blocks", type=positive_int, default=10_000, help="blocks resident in the host tier (>= --hit-blocks)")
    parser.add_argument("--requests", type=positive_int, default=64, help="requests per step")
    parser.add_argument("--hit-blocks", type=positive_int, default=64, help="prefix hit of each admitted request (blocks)")
    parser.add_argument("--policy", type=_policy, default="asym", help="host tier eviction policy (an online kvstore policy)")
    parser.add_argument("--copy-blocks", type=positive_int, default=64, help="vLLM blocks per save/load")
    parser.add_argument("--layers", type=positive_int, default=8, help="layers of the bandwidth model (llama3-8b heads/dims)")
    parser.add_argument("--repeat", type=positive_int, default=20, help="timed repetitions")
    parser.add_argument("--trace", type=_trace_file, default=None, metavar="PATH",
                        help="also replay this Mooncake trace through the scheduler side: host-tier prefix hit ratio per policy")
    parser.add_argument("--trace-policies", type=names(_online_policies), default="lru,asym",
                        help="policies of the trace replay (comma-separated)")
    parser.add_argument("--trace-capacity", type=fraction_or_count, default="0.1",
                        help="host tier of the trace replay: blocks (18279) or a fraction of the trace's unique blocks (0.1)")
    parser.add_argument("--remote", type=_remote_url, default=None, metavar="URL",
                        help="also measure a remote tier on this Redis-protocol server (redis://host:port): save/load GB/s, "
                             "hit latency, and with --trace two engines sharing it against each alone")
    add_common_args(parser)


def _key(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "little", signed=True)).digest()


def _request(rid: str, p: int, new: int, H: int, bs: int) -> SimpleNamespace:
    """A vLLM ``Request`` stand-in: the first ``H`` blocks of prefix ``p``, then 4 blocks unique
    to it (keys from ``new``), then 3 tokens."""
    hashes = [_key(p * 1_000_003 + j) for j in range(H)] + [_key(-1 - 4 * new - j) for j in range(4)]
    n = (H + 4) * bs + 3
    return SimpleNamespace(request_id=rid, block_hashes=hashes, num_tokens=n, num_prompt_tokens=n, num_computed_tokens=0)


def _filled_side(args, host_blocks: int):
    """A scheduler side over a host tier of ``host_blocks`` slots holding every block of
    ``cached_blocks // hit_blocks`` prefixes of ``hit_blocks`` blocks."""
    from kvstore.evict.cost import CostModel
    from kvstore.integrations.vllm import KVStoreConnectorConfig, _SchedulerSide
    from kvstore.spec import KVSpec

    spec = KVSpec.preset("llama3-8b")
    side = _SchedulerSide(
        KVStoreConnectorConfig(host_blocks=host_blocks, policy=args.policy), spec, spec.block_size, CostModel.preset("llama3-8b"),
    )
    H = args.hit_blocks
    for p in range(args.cached_blocks // H):
        side.index.insert([_key(p * 1_000_003 + j) for j in range(H)], [j * spec.block_size for j in range(H)])
    return side


def _empty_step(new_reqs=(), num_scheduled_tokens=None) -> SimpleNamespace:
    """A ``SchedulerOutput`` stand-in scheduling ``new_reqs`` and no running request."""
    return SimpleNamespace(
        scheduled_new_reqs=list(new_reqs), num_scheduled_tokens=num_scheduled_tokens or {},
        scheduled_cached_reqs=SimpleNamespace(req_ids=[], new_block_ids=[], resumed_req_ids=set(), num_computed_tokens=[]),
    )


def _scheduler_bench(args) -> dict:
    import numpy as np

    R, H = args.requests, args.hit_blocks
    prefixes = args.cached_blocks // H
    side = _filled_side(args, args.cached_blocks + 4 * R * H)
    bs = side.spec.block_size
    assert len(side.index) == prefixes * H
    rng = np.random.default_rng(args.seed)

    arrivals = [_request(f"n{i}", int(rng.integers(prefixes)), i, H, bs) for i in range(R)]  # hashing is vLLM's cost, not timed

    def admit():
        for req in arrivals:
            ext, _ = side.get_num_new_matched_tokens(req, 0)
            blocks = SimpleNamespace(get_block_ids=lambda n=H + 5: ([*range(n)],))
            side.update_state_after_alloc(req, blocks, ext)
        side.build_connector_meta(_empty_step())
        side.reqs.clear()

    running = [_request(f"r{i}", i % prefixes, R + i, H, bs) for i in range(R)]
    for r in running:
        side._state(r).gpu_blocks = list(range(H + 5))
        side._state(r).num_saved = H + 4
    decode_so = SimpleNamespace(
        scheduled_new_reqs=[], num_scheduled_tokens={r.request_id: 1 for r in running},
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[r.request_id for r in running], new_block_ids=[None] * R, resumed_req_ids=set(),
            num_computed_tokens=[r.num_tokens for r in running],
        ),
    )
    t_decode = time_fn(lambda: side.build_connector_meta(decode_so), warmup=3, repeat=args.repeat)
    t_admit = time_fn(admit, warmup=2, repeat=args.repeat)
    return {
        "cached_blocks": len(side.index),
        "requests_per_step": R,
        "hit_blocks": H,
        "decode_us_per_request": t_decode.median_ms * 1e3 / R,
        "admit_us_per_request": t_admit.median_ms * 1e3 / R,
        "full_tier": _full_tier_bench(args),
    }


def _full_tier_bench(args) -> dict:
    """Admission into a full host tier: per request, lookup + load planning (pins its hits);
    then the step's saves of the blocks not in the tier, which evict as many victims. Each step
    admits fresh requests (new keys), prepared before timing."""
    import numpy as np

    R, H, warmup = args.requests, args.hit_blocks, 3
    prefixes = args.cached_blocks // H
    side = _filled_side(args, prefixes * H)
    bs = side.spec.block_size
    assert side.index.pool.num_free == 0
    rng = np.random.default_rng(args.seed + 1)
    steps = iter([
        [_request(f"f{s}.{i}", int(rng.integers(prefixes)), s * R + i, H, bs) for i in range(R)] for s in range(warmup + args.repeat)
    ])  # hashing is vLLM's cost, not timed
    seen = {"hit": 0, "saved": 0, "evicted": 0, "requests": 0}

    def admit_full():
        batch = next(steps)
        new_reqs, scheduled = [], {}
        for req in batch:
            ext, _ = side.get_num_new_matched_tokens(req, 0)
            blocks = SimpleNamespace(get_block_ids=lambda n=H + 5: ([*range(n)],))
            side.update_state_after_alloc(req, blocks, ext)
            new_reqs.append(SimpleNamespace(req_id=req.request_id, block_ids=([*range(H + 5)],), num_computed_tokens=ext))
            scheduled[req.request_id] = req.num_tokens - ext
            seen["hit"] += ext // bs
        meta = side.build_connector_meta(_empty_step(new_reqs, scheduled))
        side.reqs.clear()
        seen["saved"] += len(meta.saves)
        seen["evicted"] += len(meta.spills)
        seen["requests"] += R

    t = time_fn(admit_full, warmup=warmup, repeat=args.repeat)
    n = seen["requests"]
    return {
        "host_blocks": side.index.pool.num_slots,
        "admit_us_per_request": t.median_ms * 1e3 / R,
        "hit_blocks_per_request": seen["hit"] / n,
        "saved_blocks_per_request": seen["saved"] / n,
        "evicted_blocks_per_request": seen["evicted"] / n,
    }


def trace_hits(trace, policy: str, host_blocks: int, *, engines: int = 1, remote_url: str | None = None, **config) -> dict:
    """Replay ``trace`` (a kvstore Trace, one host block per trace block) through the scheduler
    side: each request looks up its prefix (get_num_new_matched_tokens), loads its hits and
    saves the rest of its prompt (build_connector_meta), one request per step, with no GPU
    prefix cache above the host tier. Returns the prefix hit ratio (blocks loaded / blocks read).

    ``engines`` > 1 routes request ``r`` to engine ``r % engines`` (a round-robin load
    balancer), each with its own host tier of ``host_blocks``. With ``remote_url`` they share
    a remote tier on that server: every block an engine saves or spills is written there (as
    the worker's write-through does) and every lookup asks it. Its values are stand-ins of a
    1 KB layout (the hit ratio does not depend on a block's bytes), in a namespace of this run.
    """
    import uuid

    import numpy as np
    import torch

    from kvstore.evict.cost import CostModel
    from kvstore.integrations.lmcache import ColdTierConfig, LMCacheRemoteTier, cold_key
    from kvstore.integrations.vllm import KVStoreConnectorConfig, _SchedulerSide
    from kvstore.spec import KVSpec

    bs = trace.block_tokens
    spec = KVSpec.preset("llama3-8b", block_size=bs)
    cost = CostModel.preset("llama3-8b")
    shared = None
    if remote_url is not None:
        stand_in = KVSpec(num_layers=1, num_kv_heads=1, num_q_heads=1, head_dim=8, dtype=torch.float32, block_size=32)
        cold = ColdTierConfig(remote_url=remote_url, timeout_s=5.0)
        shared = LMCacheRemoteTier(cold, stand_in, model_name=f"kvstore-bench-{uuid.uuid4().hex[:8]}")
        block = torch.ones(stand_in.block_shape)
        config = config | {"cold_tier": cold}
    sides = [_SchedulerSide(KVStoreConnectorConfig(host_blocks=host_blocks, policy=policy, **config), spec, bs, cost)
             for _ in range(engines)]
    if shared is not None:
        for side in sides:  # ask the stand-in namespace instead of the llama3-8b one the config names
            side.index.cold.close()
            side.index.cold.remote = shared
    per_block = cost.recompute_flops(np.arange(trace.max_request_blocks, dtype=np.int64) * bs, bs)
    # [i]: FLOPs of blocks i.. of a request as long as the longest (a trailing 0 for i = its length)
    computed = np.append(np.cumsum(per_block[::-1])[::-1], 0.0)
    hits, flops = 0, 0.0
    for r in range(trace.num_requests):
        ids = trace.request(r).tolist()
        if not ids:
            continue
        side = sides[r % engines]
        hashes = [_key(b) for b in ids]
        n = len(ids) * bs + 1
        req = SimpleNamespace(request_id="r", block_hashes=hashes, num_tokens=n, num_prompt_tokens=n, num_computed_tokens=0)
        ext, _ = side.get_num_new_matched_tokens(req, 0)
        gpu = [*range(len(ids) + 1)]
        side.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: (gpu,)), ext)
        new = SimpleNamespace(req_id="r", block_ids=(gpu,), num_computed_tokens=ext)
        meta = side.build_connector_meta(_empty_step([new], {"r": n - ext}))
        if shared is not None:
            for key in [*meta.saves.keys, *(k for _, k in meta.spills)]:
                shared.put(cold_key(key), block)
            shared.flush()
        side.reqs.clear()
        h = ext // bs
        hits += h
        flops += computed[h] - computed[len(ids)]
    out = {
        "policy": policy, "host_blocks": host_blocks, "engines": engines, "shared_remote": shared is not None,
        **{k: v for k, v in config.items() if k != "cold_tier"},
        "prefix_hit_ratio": hits / trace.num_block_requests, "prefill_tflops": flops / 1e12,
    }
    if shared is not None:
        out["remote"] = shared.stats.as_dict()
        shared.close()
    return out


def _remote_bench(args) -> dict:
    """Save/load bandwidth and hit latency of the remote tier at ``args.remote`` (llama3-8b
    blocks of ``--layers`` layers, ``--copy-blocks`` per batch, fresh keys per repetition)."""
    import time
    import uuid

    import numpy as np
    import torch

    from kvstore.integrations.lmcache import ColdTierConfig, LMCacheRemoteTier
    from kvstore.spec import KVSpec

    spec = KVSpec.preset("llama3-8b", num_layers=args.layers)
    n = args.copy_blocks
    g = torch.Generator().manual_seed(args.seed)
    blocks = (torch.randn((n, *spec.block_shape), generator=g) + 0.5).to(spec.dtype)
    outs = [torch.empty(spec.block_shape, dtype=spec.dtype) for _ in range(n)]
    cfg = ColdTierConfig(remote_url=args.remote, timeout_s=30.0, staging_mib=max(256.0, 3 * n * spec.bytes_per_block / 2**20))
    tier = LMCacheRemoteTier(cfg, spec, model_name=f"kvstore-bench-{uuid.uuid4().hex[:8]}")
    save_s, load_s, hit_ms, lookup_ms, lookup_batch_ms = [], [], [], [], []
    try:
        for rep in range(args.repeat):
            keys = [rep * n + i for i in range(n)]
            t0 = time.perf_counter()
            sent = [tier.put(k, blocks[i]) for i, k in enumerate(keys)]
            tier.flush()
            save_s.append(time.perf_counter() - t0)
            if not all(sent) or tier.stats.failed_puts:
                raise ConfigError(f"--remote {args.remote}: writes failed or dropped ({tier.stats})")
            t0 = time.perf_counter()
            got = tier.get_many(keys, outs)
            load_s.append(time.perf_counter() - t0)
            if not all(got) or not torch.equal(outs[-1], blocks[-1]):
                raise ConfigError(f"--remote {args.remote}: reads failed ({tier.stats})")
            t0 = time.perf_counter()
            tier.get(keys[0], outs[0])
            hit_ms.append(1e3 * (time.perf_counter() - t0))
            t0 = time.perf_counter()
            tier.count_leading(keys[:1])
            lookup_ms.append(1e3 * (time.perf_counter() - t0))
            t0 = time.perf_counter()
            tier.count_leading(keys)
            lookup_batch_ms.append(1e3 * (time.perf_counter() - t0))
    finally:
        tier.close()
    nbytes = n * spec.bytes_per_block
    med = lambda xs: float(np.median(xs))  # noqa: E731
    return {
        "url": args.remote, "blocks": n, "bytes": nbytes, "block_bytes": spec.bytes_per_block,
        "save_gbps": nbytes / med(save_s) / 1e9, "load_gbps": nbytes / med(load_s) / 1e9,
        "hit_latency_ms": med(hit_ms), "lookup_latency_ms": med(lookup_ms), "lookup_batch_ms": med(lookup_batch_ms),
    }


def _load_trace(args):
    """The ``--trace`` trace and its host-tier capacity in blocks (before any measurement)."""
    from kvstore.evict.trace import load_mooncake

    trace = load_mooncake(args.trace)
    (cap,) = parse_capacities([args.trace_capacity], trace.num_unique_blocks)
    return trace, cap


def _bandwidth_bench(args, device: torch.device) -> dict:
    import torch
    from kvstore.integrations.vllm import BlockCopy, HostTierWorker
    from kvstore.spec import KVSpec

    spec = KVSpec.preset("llama3-8b", num_layers=args.layers)
    n = args.copy_blocks
    num_gpu = 2 * n + 1
    names = [f"l{i}" for i in range(spec.num_layers)]
    g = torch.Generator().manual_seed(args.seed)
    caches = {
        name: torch.randn((num_gpu, spec.num_kv_heads, spec.block_size, 2 * spec.head_dim), generator=g).to(spec.dtype).to(device)
        for name in names
    }
    w = HostTierWorker(spec, n, spec.block_size, names)
    w.register(caches, num_gpu)
    keys = [_key(i) for i in range(n)]
    save = BlockCopy.build(list(range(n)), keys, list(range(1, n + 1)), 0, 1)
    load = BlockCopy.build(list(range(n)), keys, list(range(n + 1, 2 * n + 1)), 0, 1)
    t_save = time_fn(lambda: w.save_blocks(save), warmup=2, repeat=args.repeat, device=device)
    t_load = time_fn(lambda: w.load_blocks(load), warmup=2, repeat=args.repeat, device=device)
    src = torch.empty((n, *spec.block_shape), dtype=spec.dtype, device=device)
    dst = torch.empty((n, *spec.block_shape), dtype=spec.dtype, pin_memory=device.type == "cuda")
    t_copy = time_fn(lambda: dst.copy_(src, non_blocking=False), warmup=2, repeat=args.repeat, device=device)
    nbytes = n * spec.bytes_per_block
    return {
        "blocks": n,
        "bytes": nbytes,
        "save_gbps": nbytes / t_save.median_ms / 1e6,
        "load_gbps": nbytes / t_load.median_ms / 1e6,
        "plain_copy_gbps": nbytes / t_copy.median_ms / 1e6,
    }


def main(args) -> int:
    device = resolve_device(args.device)
    if args.cached_blocks < args.hit_blocks:
        raise ConfigError(f"--cached-blocks {args.cached_blocks} must hold at least one --hit-blocks {args.hit_blocks} prefix")
    trace, cap = _load_trace(args) if args.trace else (None, None)
    replays = [(p, leaves) for p in args.trace_policies for leaves in (True, False)] if args.trace else []
    shared = [(p, e, url) for p in args.trace_policies for e, url in ((2, None), (2, args.remote))] if args.trace and args.remote else []
    with Progress("bench connector", total=2 + len(replays) + len(shared) + bool(args.remote)) as progress:
        progress.step(f"scheduler side, policy {args.policy}: decode, admit, admit into a full tier ({args.repeat} steps each)")
        sched = _scheduler_bench(args)
        progress.step(f"worker save/load of {args.copy_blocks} blocks, {args.layers} layers")
        bw = _bandwidth_bench(args, device)
        hits = []
        for p, leaves in replays:
            progress.step(f"trace replay: policy {p}, leaves_only={leaves}, host tier {cap} blocks")
            hits.append(trace_hits(trace, p, cap, leaves_only=leaves))
        remote = None
        if args.remote:
            progress.step(f"remote tier at {args.remote}: save/load of {args.copy_blocks} blocks, {args.repeat} times")
            remote = _remote_bench(args)
        sharing = []
        for p, e, url in shared:
            progress.step(f"trace replay: {e} engines, policy {p}, host tier {cap} blocks each, " + ("sharing the remote tier" if url else "each alone"))
            sharing.append(trace_hits(trace, p, cap, engines=e, remote_url=url))
    full = sched["full_tier"]
    rows = [
        ["scheduler: decode step (build_connector_meta)", f"{sched['decode_us_per_request']:.2f} us/request", "<= 50 us"],
        ["scheduler: admit with prefix hit (lookup+alloc+meta)", f"{sched['admit_us_per_request']:.2f} us/request", "<= 50 us"],
        [
            f"scheduler: admit into the full tier ({full['host_blocks']} blocks; "
            f"{full['hit_blocks_per_request']:.1f} hit, {full['saved_blocks_per_request']:.1f} saved, "
            f"{full['evicted_blocks_per_request']:.1f} evicted per request)",
            f"{full['admit_us_per_request']:.2f} us/request", "<= 50 us",
        ],
        [f"worker save ({bw['blocks']} blocks, {bw['bytes'] / 2**20:.0f} MiB, {device.type})", f"{bw['save_gbps']:.2f} GB/s", ""],
        [f"worker load ({device.type})", f"{bw['load_gbps']:.2f} GB/s", ""],
        ["plain copy_ of the same bytes", f"{bw['plain_copy_gbps']:.2f} GB/s", "reference"],
    ]
    print_table(f"connector, policy {args.policy} ({sched['cached_blocks']} blocks cached, {sched['requests_per_step']} requests/step)", ["measure", "value", "target"], rows)
    out = {"machine": machine_info(device), "device": str(device), "policy": args.policy, "scheduler": sched, "bandwidth": bw}
    if args.trace:
        out["trace"] = hits
        print_table(
            f"host-tier prefix hits, {args.trace} through the scheduler side ({hits[0]['host_blocks']} host blocks)",
            ["policy", "leaves only", "prefix hit ratio", "prefill TFLOPs"],
            [[h["policy"], h["leaves_only"], h["prefix_hit_ratio"], h["prefill_tflops"]] for h in hits],
        )
    if remote is not None:
        out["remote"] = remote
        print_table(
            f"remote tier {args.remote} ({remote['blocks']} blocks of {remote['block_bytes'] / 2**20:.2f} MiB per batch)",
            ["measure", "value"],
            [["save (encode + write, batch)", f"{remote['save_gbps']:.3f} GB/s"], ["load (read + check, batch)", f"{remote['load_gbps']:.3f} GB/s"],
             ["hit latency (one block)", f"{remote['hit_latency_ms']:.2f} ms"], ["lookup (one key)", f"{remote['lookup_latency_ms']:.2f} ms"],
             [f"lookup ({remote['blocks']} keys)", f"{remote['lookup_batch_ms']:.2f} ms"]],
        )
    if sharing:
        out["sharing"] = sharing
        print_table(
            f"two engines (round-robin), {args.trace}, {sharing[0]['host_blocks']} host blocks each",
            ["policy", "remote tier", "prefix hit ratio", "prefill TFLOPs"],
            [[h["policy"], "shared" if h["shared_remote"] else "none (each alone)", h["prefix_hit_ratio"], h["prefill_tflops"]] for h in sharing],
        )
    write_json(args.json_out, out)
    return 0
