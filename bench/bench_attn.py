"""Multi-segment attention: the CUDA kernel vs gather+SDPA and per-segment SDPA+merge (reference on CPU).

One decode query (llama3-8b layer shape by default: 32 query heads, 8 KV heads, head_dim 128,
bf16, 16-token blocks) reads a few thousand tokens scattered as segments across a 128K-token
block pool (strided per-layer views of the store's layout, as kvstore.blocks.BlockPool keeps
them).

On a GPU, in one run (well under 5 minutes on an H100):
  (a) scattered: for each --tokens x --segments, the kernel (paged_attention, backend="cuda")
      against (i) gathering every token into a contiguous copy + one flash SDPA and (ii) one
      flash SDPA per segment (each gathered by blocks) + merge_states; targets >= 2x and >= 1.5x.
  (b) contiguous: the kernel over one contiguous --context-token context (tensor-list API, and
      paged over consecutive slots) against flash SDPA; target within 1.2x. Achieved HBM
      bandwidth (K+V bytes / time) against the measured device-to-device copy bandwidth
      (read + write bytes / time of a 1 GiB copy); target >= 70%.
On the CPU, the torch reference only: gathered (one attention) vs per-segment attention + merge.

On the GPU every variant is timed twice: eagerly (host launch overhead included, as a Python
caller sees it) and as a CUDA-graph replay (GPU time only, as a graph-captured decode step in an
engine sees it); speedups and targets use the graph timings, the eager ones are reported beside
them. Every kernel result is checked against the baseline's output before timing (max_abs_diff
in the JSON). Flash SDPA serves GQA decode by folding the G query heads of a KV head into G query rows
(no mask is needed for a single decode token), so it reads each KV head once, like the kernel.
"""

from __future__ import annotations

import argparse

from kvstore.errors import ConfigError

from .common import (
    PRESET_NAMES, Progress, add_common_args, int_list, machine_info, nonnegative_int, positive_int, print_table, resolve_device, time_fn,
    write_json,
)

#: --dtype name -> torch dtype name
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
TARGETS = {"vs_gather_sdpa": 2.0, "vs_per_segment_sdpa": 1.5, "vs_sdpa_contiguous": 1.2, "copy_bw_fraction": 0.7}


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="llama3-8b", choices=PRESET_NAMES, help="model shape (one layer)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="K/V/query dtype")
    parser.add_argument("--tokens", type=int_list, default="2048,4096,8192", help="comma-separated tokens the query reads in (a)")
    parser.add_argument("--segments", type=int_list, default="8,64", help="comma-separated segment counts those tokens are split into in (a)")
    parser.add_argument("--pool-tokens", type=positive_int, default=131072, help="tokens the block pool holds in (a)")
    parser.add_argument("--context", type=positive_int, default=131072, help="contiguous context length in (b) (GPU only)")
    parser.add_argument("--warmup", type=nonnegative_int, default=5, help="untimed calls before timing")
    parser.add_argument("--repeat", type=positive_int, default=30, help="timed calls (median reported)")
    add_common_args(parser)


def _graph_replay(fn, device: torch.device):
    """``fn`` captured in a CUDA graph (after warm-up on the capture stream); returns its replay."""
    import torch

    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    return graph.replay


def _time(row: dict, timed: dict, args, device: torch.device) -> None:
    """Median ms of every variant into ``row``: ``NAME_ms`` (graph replay on CUDA) and ``NAME_eager_ms``
    (on the CPU ``NAME_ms`` and ``NAME_min_ms``)."""
    for name, fn in timed.items():
        timing = time_fn(fn, warmup=args.warmup, repeat=args.repeat, device=device)
        eager = timing.median_ms
        if device.type != "cuda":  # CPU: the minimum too, since a shared CPU makes medians noisy
            row[f"{name}_ms"] = eager
            row[f"{name}_min_ms"] = timing.min_ms
            continue
        row[f"{name}_eager_ms"] = eager
        try:
            replay = _graph_replay(fn, device)
        except RuntimeError as exc:  # report the eager figure rather than lose the run
            row[f"{name}_graph_error"] = str(exc).splitlines()[0]
            row[f"{name}_ms"] = eager
            continue
        row[f"{name}_ms"] = time_fn(replay, warmup=args.warmup, repeat=args.repeat, device=device).median_ms


def _scatter(rng: np.random.Generator, num_tokens: int, num_segments: int, num_slots: int, block_size: int):
    """Split ``num_tokens`` into ``num_segments`` random non-empty runs placed on random free slots."""
    import numpy as np

    cuts = np.sort(rng.choice(np.arange(1, num_tokens), num_segments - 1, replace=False))
    lengths = np.diff(np.concatenate([[0], cuts, [num_tokens]]))
    blocks = -(-lengths // block_size)
    slots = rng.choice(num_slots, int(blocks.sum()), replace=False)
    runs = np.split(slots, np.cumsum(blocks)[:-1])
    return runs, lengths - (blocks - 1) * block_size, lengths


def _flash_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Flash SDPA for one decode token with GQA: q ``[1, Hq, D]``, k/v ``[T, Hkv, D]`` -> (out, lse)."""
    import torch

    hkv, dim = k.shape[1], k.shape[2]
    qg = q[0].reshape(hkv, -1, dim).unsqueeze(0)  # [1, Hkv, G, D]: G query rows per KV head
    res = torch.ops.aten._scaled_dot_product_flash_attention(
        qg, k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0), scale=scale
    )
    return res[0].reshape(1, -1, dim), res[1].reshape(1, -1)


def _check(args, device: torch.device, spec: KVSpec) -> None:
    """Option combinations the run cannot use, before any work (ConfigError naming the values)."""
    import torch

    bs = spec.block_size
    if device.type == "cuda" and spec.dtype == torch.float32:
        raise ConfigError(f"--dtype {args.dtype}: flash SDPA (the GPU baseline) needs fp16 or bf16")
    for t in args.tokens:
        for n in args.segments:
            if n > t:
                raise ConfigError(f"--segments {n} > --tokens {t}: every segment holds at least one token")
            # each segment rounds up to whole blocks: at most t // bs + n blocks
            if t // bs + n > args.pool_tokens // bs:
                raise ConfigError(
                    f"--tokens {t} in --segments {n} may need {t // bs + n} blocks of {bs} tokens; "
                    f"--pool-tokens {args.pool_tokens} holds {args.pool_tokens // bs}"
                )
    if device.type == "cuda" and args.context % bs:
        raise ConfigError(f"--context {args.context} must be a multiple of the block size {bs}")


def _bench_scattered(args, device, spec, rng, progress: Progress) -> list[dict]:
    import torch
    from kvstore.attn import BlockSegments, merge_states, paged_attention, reference
    from kvstore.blocks import BlockPool

    block_size = spec.block_size
    pool = BlockPool(spec, args.pool_tokens // block_size, device=device)
    pool.kv.normal_()
    k_cache, v_cache = pool.layer_view(0, 0), pool.layer_view(0, 1)
    q = torch.randn(1, spec.num_q_heads, spec.head_dim, device=device).to(spec.dtype)
    scale = spec.head_dim**-0.5
    on_gpu = device.type == "cuda"
    rows = []
    for num_tokens in args.tokens:
        for num_segments in args.segments:
            progress.step(f"(a) {num_tokens} tokens in {num_segments} segments")
            runs, last, lengths = _scatter(rng, num_tokens, num_segments, pool.num_slots, block_size)
            segments = BlockSegments.from_runs(runs, last, block_size=block_size, device=device)
            slot_tok, off_tok = segments.token_slots()
            seg_slots = [torch.as_tensor(r, device=device) for r in runs]

            def gather_segment(index: int):
                """Segment ``index`` as contiguous ``[len, Hkv, D]`` K and V (copied by whole blocks)."""
                slots, n = seg_slots[index], int(lengths[index])
                k = k_cache.index_select(0, slots).flatten(0, 1)[:n]
                return k, v_cache.index_select(0, slots).flatten(0, 1)[:n]

            row = {"tokens": num_tokens, "segments": num_segments, "bytes": num_tokens * spec.bytes_per_token}
            if on_gpu:
                def kernel():
                    return paged_attention(q, k_cache, v_cache, segments, backend="cuda")

                def gather_sdpa():
                    return _flash_decode(q, k_cache[slot_tok, off_tok], v_cache[slot_tok, off_tok], scale)

                def per_segment_sdpa():
                    parts = [_flash_decode(q, *gather_segment(i), scale) for i in range(num_segments)]
                    outs = torch.stack([o for o, _ in parts], dim=1)
                    lses = torch.stack([lse for _, lse in parts], dim=1)
                    return merge_states(outs, lses, backend="cuda")

                expect = gather_sdpa()[0].float()
                diffs = [(fn()[0].float() - expect).abs().max().item() for fn in (kernel, per_segment_sdpa)]
                row["max_abs_diff"] = max(diffs)
                timed = {"kernel": kernel, "gather_sdpa": gather_sdpa, "per_segment_sdpa": per_segment_sdpa}
            else:
                def gathered():
                    return paged_attention(q, k_cache, v_cache, segments, backend="torch")

                def per_segment_merge():
                    return reference.multi_segment_attention_merged(q, [gather_segment(i) for i in range(num_segments)])

                row["max_abs_diff"] = (gathered()[0].float() - per_segment_merge()[0].float()).abs().max().item()
                timed = {"ref_gathered": gathered, "ref_per_segment_merge": per_segment_merge}
            _time(row, timed, args, device)
            if on_gpu:
                row["speedup_vs_gather_sdpa"] = row["gather_sdpa_ms"] / row["kernel_ms"]
                row["speedup_vs_per_segment_sdpa"] = row["per_segment_sdpa_ms"] / row["kernel_ms"]
                row["kernel_gbs"] = row["bytes"] / row["kernel_ms"] / 1e6
            rows.append(row)
    del pool
    return rows


def _copy_bandwidth(device, repeat: int) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read + written."""
    import torch

    nbytes = 1 << 30
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), warmup=3, repeat=repeat, device=device).median_ms
    return 2 * nbytes / ms / 1e6


def _bench_contiguous(args, device, spec) -> dict:
    import numpy as np
    import torch
    from kvstore.attn import BlockSegments, multi_segment_attention, paged_attention
    from kvstore.blocks import BlockPool

    t, hkv, dim = args.context, spec.num_kv_heads, spec.head_dim
    k = torch.randn(t, hkv, dim, device=device).to(spec.dtype)
    v = torch.randn(t, hkv, dim, device=device).to(spec.dtype)
    q = torch.randn(1, spec.num_q_heads, dim, device=device).to(spec.dtype)
    pool = BlockPool(spec, t // spec.block_size, device=device)
    pool.kv.normal_()
    segments = BlockSegments.from_runs([np.arange(pool.num_slots)], [spec.block_size], block_size=spec.block_size,
                                       device=device)  # fmt: skip
    scale = dim**-0.5
    timed = {
        "kernel": lambda: multi_segment_attention(q, [(k, v)], backend="cuda"),
        "kernel_paged": lambda: paged_attention(q, pool.layer_view(0, 0), pool.layer_view(0, 1), segments,
                                                backend="cuda"),  # fmt: skip
        "sdpa_flash": lambda: _flash_decode(q, k, v, scale),
    }
    expect = timed["sdpa_flash"]()[0].float()
    row = {"context": t, "bytes": 2 * k.numel() * k.element_size(),
           "max_abs_diff": (timed["kernel"]()[0].float() - expect).abs().max().item()}  # fmt: skip
    _time(row, timed, args, device)
    for name in timed:
        row[f"{name}_gbs"] = row["bytes"] / row[f"{name}_ms"] / 1e6
    row["kernel_over_sdpa"] = row["kernel_ms"] / row["sdpa_flash_ms"]
    row["copy_gbs"] = _copy_bandwidth(device, args.repeat)
    row["kernel_bw_fraction"] = row["kernel_gbs"] / row["copy_gbs"]
    return row


def main(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from kvstore.spec import KVSpec

    device = resolve_device(args.device)
    spec = KVSpec.preset(args.preset, num_layers=1, dtype=getattr(torch, DTYPES[args.dtype]))
    _check(args, device, spec)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    payload = {
        "benchmark": "attn",
        "machine": machine_info(device),
        "config": {k: v for k, v in vars(args).items() if k not in ("run", "json_out")}
        | {"num_q_heads": spec.num_q_heads, "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
           "block_size": spec.block_size},  # fmt: skip
        "timing": "median ms; on CUDA NAME_ms is a CUDA-graph replay (GPU time), NAME_eager_ms an eager call",
    }
    with Progress("bench attn", total=len(args.tokens) * len(args.segments) + (device.type == "cuda")) as progress:
        scattered = payload["scattered"] = _bench_scattered(args, device, spec, rng, progress)
        if device.type == "cuda":
            progress.step(f"(b) one contiguous {args.context}-token context")
            payload["contiguous"] = _bench_contiguous(args, device, spec)
    if device.type == "cuda":
        print_table(
            f"(a) decode over scattered segments, {args.preset} {args.dtype}, pool {args.pool_tokens} tokens",
            ["tokens", "segments", "kernel ms", "gather+SDPA ms", "per-seg SDPA ms", "x gather", "x per-seg",
             "kernel GB/s", "kernel eager ms", "max diff"],
            [[r["tokens"], r["segments"], r["kernel_ms"], r["gather_sdpa_ms"], r["per_segment_sdpa_ms"],
              r["speedup_vs_gather_sdpa"], r["speedup_vs_per_segment_sdpa"], r["kernel_gbs"], r["kernel_eager_ms"],
              r["max_abs_diff"]]
             for r in scattered],
        )  # fmt: skip
        c = payload["contiguous"]
        print_table(
            f"(b) decode over one contiguous {args.context}-token context",
            ["op", "ms", "GB/s", "of copy BW", "eager ms"],
            [[name, c[f"{name}_ms"], c[f"{name}_gbs"], c[f"{name}_gbs"] / c["copy_gbs"], c[f"{name}_eager_ms"]]
             for name in ("kernel", "kernel_paged", "sdpa_flash")] + [["d2d copy", None, c["copy_gbs"], 1.0, None]],
        )  # fmt: skip
        payload["targets"] = {
            "vs_gather_sdpa": min(r["speedup_vs_gather_sdpa"] for r in scattered) >= TARGETS["vs_gather_sdpa"],
            "vs_per_segment_sdpa": min(r["speedup_vs_per_segment_sdpa"] for r in scattered)
            >= TARGETS["vs_per_segment_sdpa"],
            "vs_sdpa_contiguous": c["kernel_over_sdpa"] <= TARGETS["vs_sdpa_contiguous"],
            "copy_bw_fraction": c["kernel_bw_fraction"] >= TARGETS["copy_bw_fraction"],
        }
        print("targets met:", payload["targets"])
    else:
        print_table(
            f"decode over scattered segments, torch reference on CPU, {args.preset} {args.dtype}",
            ["tokens", "segments", "gathered ms", "min", "per-seg+merge ms", "min", "max diff"],
            [[r["tokens"], r["segments"], r["ref_gathered_ms"], r["ref_gathered_min_ms"],
              r["ref_per_segment_merge_ms"], r["ref_per_segment_merge_min_ms"], r["max_abs_diff"]]
             for r in scattered],
        )  # fmt: skip
    write_json(args.json_out, payload)
    return 0
