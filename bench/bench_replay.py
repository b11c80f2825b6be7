"""Replay a request trace through the eviction policies: hit ratios, recompute cost, TTFT, speed.

Each policy runs at each device capacity (blocks, or fractions of the trace's unique blocks)
with an optional host tier. The table and the JSON report recompute under the chosen
``--semantics``; ``--anchor-libcachesim`` also times libCacheSim's LRU on the same block stream
(same run, same machine) and checks its hit ratio against ours.

*Gap closed* is how much of LRU's distance to the Belady bound a policy's block hit ratio
covers, ``(policy - LRU) / (Belady - LRU)``, at each capacity (and host tier): LRU is 0,
Belady 1. It needs both in the run (the default ``--policies`` has them); without either, or
where Belady hits no more than LRU, the table prints ``-`` and the JSON ``null``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from kvstore.errors import ConfigError
from kvstore.evict import POLICIES
from kvstore.evict.cost import CostModel
from kvstore.evict.replay import SEMANTICS, ReplayConfig, ReplayResult, replay
from kvstore.evict.trace import TRACE_FORMATS, Trace, load_trace
from kvstore.spec import MODEL_COSTS

from kvstore._locate import default_trace

from .common import (
    add_common_args, capacity, machine_info, names, nonnegative_capacity, parse_capacities, plot_file, positive_float,
    positive_int, print_table, save_figure, write_json,
)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", default=None, help="trace file (default: the shared Mooncake conversation trace, found from any directory)")
    parser.add_argument("--format", default="mooncake", choices=sorted(TRACE_FORMATS), help="trace line format")
    parser.add_argument("--block-tokens", type=positive_int, default=None, help="tokens per trace block (default: 512 for mooncake, 16 for jsonl)")
    parser.add_argument("--limit", type=positive_int, default=None, help="replay only the first LIMIT requests")
    parser.add_argument("--policies", type=names(lambda: POLICIES), default=["lru", "asym", "belady"],
                        help=f"comma-separated device policies; registered: {','.join(sorted(POLICIES))}. The gap-closed "
                             f"column, (policy - lru) / (belady - lru) of block hit ratio, needs lru and belady among them "
                             f"(else it shows '-')")
    parser.add_argument("--capacity-blocks", type=capacity, default=[0.1], help="comma-separated device capacities: block counts (18279) or fractions of the unique blocks (0.1)")
    parser.add_argument("--host-blocks", type=nonnegative_capacity, default=[0], help="host tier capacity: blocks or a fraction of the unique blocks (0: no host tier)")
    parser.add_argument("--host-policy", default="lru", help="host tier policy")
    parser.add_argument("--leaves-only", action="store_true",
                        help="the device tier evicts only blocks no resident block extends (vLLM's prefix-tree eviction)")
    parser.add_argument("--semantics", default="multi-segment", choices=SEMANTICS, help="recovery semantics of recompute_tflops in the table and JSON")
    parser.add_argument("--model", default="llama3-8b", choices=sorted(MODEL_COSTS), help="model whose KV bytes and FLOPs are costed")
    parser.add_argument("--compute-tflops", type=positive_float, default=400.0, help="prefill/recompute throughput for TTFT (TFLOP/s)")
    parser.add_argument("--load-gbps", type=positive_float, default=50.0, help="host-to-device bandwidth for loads (GB/s)")
    parser.add_argument("--plot", type=plot_file, default=None, metavar="OUT.png",
                        help="plot hit ratio, gap closed (needs lru and belady) and recompute cost against capacity")
    parser.add_argument("--anchor-libcachesim", action="store_true", help="also time libCacheSim's LRU on the same block stream")
    add_common_args(parser)


def libcachesim_lru(trace: Trace, capacities: list[int]) -> list[dict]:
    """libCacheSim's LRU on ``trace.blocks`` (one object of size 1 per block read), timed on its
    C trace reader (writing the oracleGeneral file is not timed)."""
    import libcachesim as lcs  # GPL: a benchmark/test-only dependency, never imported by kvstore

    record = np.dtype([("t", "<u4"), ("id", "<u8"), ("size", "<u4"), ("next", "<i8")])
    rows = np.zeros(trace.num_block_requests, dtype=record)
    rows["t"] = np.arange(trace.num_block_requests)
    rows["id"] = trace.blocks
    rows["size"] = 1
    rows["next"] = -1
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "blocks.oracleGeneral")
        rows.tofile(path)
        for cap in capacities:
            reader = lcs.TraceReader(path, lcs.TraceType.ORACLE_GENERAL_TRACE)
            cache = lcs.LRU(cache_size=cap)
            t0 = time.perf_counter()
            miss_ratio, _ = cache.process_trace(reader)
            seconds = time.perf_counter() - t0
            out.append({
                "capacity_blocks": cap,
                "block_hit_ratio": 1.0 - miss_ratio,
                "block_requests_per_s": trace.num_block_requests / seconds,
            })
    return out


def gap_closed(results: list[ReplayResult]) -> list[float | None]:
    """Per result, ``(hit - LRU's) / (Belady's - LRU's)`` of block hit ratio at its capacity and
    host tier; None where lru or belady did not run there, or Belady hits no more than LRU."""
    by = {(r.policy, r.capacity_blocks, r.host_blocks): r.block_hit_ratio for r in results}
    out: list[float | None] = []
    for r in results:
        lru, bound = by.get(("lru", r.capacity_blocks, r.host_blocks)), by.get(("belady", r.capacity_blocks, r.host_blocks))
        out.append(None if lru is None or bound is None or bound <= lru else (r.block_hit_ratio - lru) / (bound - lru))
    return out


def figure(results: list[ReplayResult], semantics: str, title: str):
    """The ``--plot`` figure: hit ratio, gap closed and recompute against capacity, a line per
    policy (Belady dashed: the bound; gap closed has no line for lru and belady, 0 and 1 by
    definition, nor where it is undefined)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_hit, ax_gap, ax_cost) = plt.subplots(1, 3, figsize=(16, 4.2))
    gaps = dict(zip(map(id, results), gap_closed(results)))
    for i, name in enumerate(dict.fromkeys(r.policy for r in results)):
        rs = sorted((r for r in results if r.policy == name), key=lambda r: r.capacity_blocks)
        x = [r.capacity_blocks for r in rs]
        bound = name == "belady"
        style = dict(color="black", linestyle="--", label=f"{name} (bound)") if bound else dict(color=f"C{i}", marker="o", label=name)
        ax_hit.plot(x, [r.block_hit_ratio for r in rs], **style)
        ax_cost.plot(x, [r.costs[semantics].recompute_flops / 1e12 for r in rs], **style)
        closed = [(r.capacity_blocks, gaps[id(r)]) for r in rs if gaps[id(r)] is not None]
        if name not in ("lru", "belady") and closed:
            ax_gap.plot(*zip(*closed), **style)
    ax_gap.axhline(0.0, color="gray", linewidth=1, label="lru")
    ax_gap.axhline(1.0, color="black", linestyle="--", linewidth=1, label="belady")
    ax_hit.set(xlabel="device capacity (blocks)", ylabel="block hit ratio", title="hit ratio")
    ax_gap.set(xlabel="device capacity (blocks)", ylabel="(policy - LRU) / (Belady - LRU)", title="LRU-to-Belady gap closed")
    ax_cost.set(xlabel="device capacity (blocks)", ylabel="recompute (TFLOPs)", title=f"recompute, {semantics}")
    for ax in (ax_hit, ax_gap, ax_cost):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot(results: list[ReplayResult], semantics: str, path: str, title: str) -> None:
    save_figure(figure(results, semantics, title), path)


def summarize(results: list[ReplayResult], semantics: str) -> list[str]:
    """asym against LRU and Belady at each capacity where all three ran."""
    lines = []
    by = {(r.policy, r.capacity_blocks, r.host_blocks): (r, g) for r, g in zip(results, gap_closed(results))}
    for (name, cap, host), (lru, _) in by.items():
        asym, closed = by.get(("asym", cap, host), (None, None))
        if name != "lru" or asym is None:
            continue
        ratio = asym.costs[semantics].recompute_flops / max(lru.costs[semantics].recompute_flops, 1e-30)
        line = (f"capacity {cap} (host {host}): asym recompute = {ratio:.3f} x LRU's, "
                f"hit ratio {asym.block_hit_ratio:.4f} vs LRU {lru.block_hit_ratio:.4f} "
                f"({asym.block_hit_ratio - lru.block_hit_ratio:+.4f})")
        if closed is not None:
            bound = by[("belady", cap, host)][0]
            line += f"; closes {closed:.1%} of the LRU->Belady hit-ratio gap ({bound.block_hit_ratio:.4f})"
        lines.append(line)
    return lines


def main(args: argparse.Namespace) -> int:
    if len(args.host_blocks) != 1:
        raise ConfigError(f"--host-blocks: one capacity, got {len(args.host_blocks)}")
    args.trace = args.trace or str(default_trace())
    trace = load_trace(args.trace, args.format, block_tokens=args.block_tokens, limit=args.limit)
    policies = args.policies
    capacities = parse_capacities(args.capacity_blocks, trace.num_unique_blocks)
    (host_blocks,) = parse_capacities(args.host_blocks, trace.num_unique_blocks, allow_zero=True)
    cost = CostModel.preset(args.model, compute_throughput=args.compute_tflops * 1e12, reload_bandwidth=args.load_gbps * 1e9)
    progress = trace.num_requests >= 2000

    results: list[ReplayResult] = []
    for cap in capacities:
        config = ReplayConfig(capacity_blocks=cap, host_blocks=host_blocks, host_policy=args.host_policy, model=args.model, cost=cost,
                              leaves_only=args.leaves_only)
        for name in policies:
            results.append(replay(trace, name, config, policy_kwargs=_policy_kwargs(name, cost), progress=progress))

    sem = args.semantics
    gaps = gap_closed(results)
    print_table(
        f"replay {Path(args.trace).name}: {trace.num_requests} requests, {trace.num_block_requests} block reads, "
        f"{trace.num_unique_blocks} unique blocks ({sem})",
        ["policy", "capacity", "host", "block hit", "gap closed", "prefix hit", "host hit", "recompute TFLOPs",
         "mean TTFT ms", "p99 TTFT ms", "req/s", "blocks/s"],
        [
            (r.policy, r.capacity_blocks, r.host_blocks, r.block_hit_ratio, g, r.prefix_hit_ratio, r.host_hit_ratio,
             r.costs[sem].recompute_flops / 1e12, r.costs[sem].mean_ttft_ms, r.costs[sem].p99_ttft_ms,
             r.sim_requests_per_s, r.block_requests_per_s)
            for r, g in zip(results, gaps)
        ],
    )
    for line in summarize(results, sem):
        print(line)

    anchor = None
    if args.anchor_libcachesim:
        anchor = libcachesim_lru(trace, capacities)
        ours = {r.capacity_blocks: r for r in results if r.policy == "lru" and r.host_blocks == 0}
        for a in anchor:
            mine = ours.get(a["capacity_blocks"])
            a["matches_kvstore_lru"] = None if mine is None else abs(mine.block_hit_ratio - a["block_hit_ratio"]) < 1e-12
            print(f"libCacheSim LRU @ {a['capacity_blocks']}: hit ratio {a['block_hit_ratio']:.6f}"
                  f"{'' if mine is None else f' (kvstore lru {mine.block_hit_ratio:.6f})'}, "
                  f"{a['block_requests_per_s']:,.0f} block requests/s")

    if args.plot:
        plot(results, sem, args.plot, f"{Path(args.trace).name}, host tier {host_blocks} blocks")
    write_json(args.json_out, {
        "results": [{**r.row(sem), "gap_closed": g} for r, g in zip(results, gaps)],
        "trace": {"path": str(args.trace), "format": args.format, "requests": trace.num_requests,
                  "block_requests": trace.num_block_requests, "unique_blocks": trace.num_unique_blocks,
                  "block_tokens": trace.block_tokens},
        "model": args.model,
        "libcachesim_lru": anchor,
        "machine": machine_info("cpu"),
    })
    return 0


def _policy_kwargs(name: str, cost: CostModel) -> dict:
    """Policies that price recompute in seconds get the throughput the TTFT estimate uses."""
    params = inspect.signature(POLICIES[name]).parameters
    return {"compute_throughput": cost.compute_throughput} if "compute_throughput" in params else {}
