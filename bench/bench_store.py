"""Block store throughput: append / offload / load GB/s and per-decode-step bookkeeping time.

For each context length a Llama-shaped sequence (llama3-8b's heads and head_dim, fewer layers
so it fits in memory) is appended in prefill chunks, offloaded to the host tier, loaded back,
and read; then decode steps append one token each while the bookkeeping a step needs (append,
the device block table for attention, residency) is timed. On CUDA it also compares the
host->device bandwidth of scattered 16-token blocks with one contiguous copy of the same bytes.
"""

from __future__ import annotations

import argparse
import os
import time

from kvstore.errors import ConfigError

from .common import PRESET_NAMES, Progress, add_common_args, int_list, machine_info, positive_int, print_table, resolve_device, time_fn, write_json


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    add_common_args(parser)
    parser.add_argument("--preset", default="llama3-8b", choices=PRESET_NAMES, help="KVSpec preset whose heads/head_dim/dtype are used")
    parser.add_argument("--layers", type=positive_int, default=4, help="layers kept from the preset (scaled to fit memory)")
    parser.add_argument("--contexts", type=int_list, default="32768", help="comma-separated context lengths in tokens")
    parser.add_argument("--chunk", type=positive_int, default=4096, help="prefill chunk size in tokens")
    parser.add_argument("--decode-steps", type=positive_int, default=200, help="timed decode steps per context")
    parser.add_argument("--repeat", type=positive_int, default=3, help="repetitions of each throughput measurement (median)")


def _memory_bytes(device: torch.device) -> int:
    """Physical memory of ``device``: RAM for the CPU, the GPU's total memory for CUDA."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_memory(spec: KVSpec, contexts: list[int], args, device: torch.device) -> None:
    """Refuse, before any work, a context whose store (device + host tier) and prefill chunk
    cannot fit: the largest context allocates two tiers of its blocks (run_context)."""
    import torch

    n = max(contexts)
    tier = (spec.num_blocks(n + args.decode_steps + args.repeat * 2) + 1) * spec.bytes_per_block
    chunk = spec.num_layers * 2 * args.chunk * spec.num_kv_heads * spec.head_dim * spec.dtype.itemsize
    need = {"cpu": 2 * tier + chunk} if device.type == "cpu" else {"cpu": tier, "cuda": tier + chunk}
    for kind, nbytes in need.items():
        have = _memory_bytes(device if kind == device.type else torch.device("cpu"))
        if nbytes > have:
            raise ConfigError(
                f"--contexts {n} with --layers {args.layers} needs {nbytes / 2**30:.1f} GiB of {kind} memory, "
                f"this machine has {have / 2**30:.1f} GiB"
            )


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _timed(fn, device: torch.device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def run_context(spec: KVSpec, n: int, args, device: torch.device) -> dict:
    import numpy as np
    import torch
    from kvstore.store import KVStore

    g = torch.Generator().manual_seed(args.seed)
    nblocks = spec.num_blocks(n + args.decode_steps + args.repeat * 2)
    store = KVStore(spec, device_blocks=nblocks + 1, host_blocks=nblocks + 1, device=device)
    for pool in (store.device_pool, store.host_pool):  # commit the pages up front, as a server would
        pool.kv.zero_()
    chunk = torch.randn(spec.num_layers, 2, args.chunk, spec.num_kv_heads, spec.head_dim, generator=g).to(spec.dtype).to(device)

    append_s, offload_s, load_s = [], [], []
    for _ in range(args.repeat):
        seq = store.create()
        t_append = 0.0
        for start in range(0, n, args.chunk):
            c = chunk[:, :, : min(args.chunk, n - start)]
            t_append += _timed(lambda: store.append(seq, c[:, 0], c[:, 1]), device)
        ids = store.block_table(seq)
        offload_s.append(_timed(lambda: store.offload(ids).synchronize(), device))
        load_s.append(_timed(lambda: store.load(ids).synchronize(), device))
        append_s.append(t_append)
        store.free(seq)
    nbytes = n * spec.bytes_per_token
    seq = store.create()
    for start in range(0, n, args.chunk):
        c = chunk[:, :, : min(args.chunk, n - start)]
        store.append(seq, c[:, 0], c[:, 1])
    one = chunk[:, :, :1]

    def decode_step():
        store.append(seq, one[:, 0], one[:, 1])
        store.device_block_table(seq)

    step = time_fn(decode_step, warmup=5, repeat=args.decode_steps, device="cpu")
    return {
        "context": n,
        "bytes": nbytes,
        "append_gbps": _gbps(nbytes, float(np.median(append_s))),
        "offload_gbps": _gbps(nbytes, float(np.median(offload_s))),
        "load_gbps": _gbps(nbytes, float(np.median(load_s))),
        "step_bookkeeping_us": step.median_ms * 1e3,
        "step_bookkeeping_p99_us": step.p99_ms * 1e3,
        "num_blocks": store.block_table(seq).numel(),
    }


def scattered_vs_contiguous(spec: KVSpec, args, device: torch.device, num_blocks: int = 2048) -> dict:
    """H2D bandwidth of ``num_blocks`` scattered host blocks (store.load) vs one contiguous pinned copy."""
    import torch
    from kvstore.store import KVStore

    store = KVStore(spec, device_blocks=num_blocks, host_blocks=2 * num_blocks, device=device)
    g = torch.Generator().manual_seed(args.seed)
    seq = store.create()
    kv = torch.randn(spec.num_layers, 2, num_blocks * spec.block_size, spec.num_kv_heads, spec.head_dim, generator=g)
    kv = kv.to(spec.dtype).to(device)
    store.append(seq, kv[:, 0], kv[:, 1])
    ids = store.block_table(seq)
    store.offload(ids).synchronize()
    order = ids[torch.randperm(ids.numel(), generator=g)]  # scattered host slots

    def roundtrip():
        store.load(order).synchronize()
        store.offload(order).synchronize()  # clean copies: frees device slots, no copy back

    scattered = time_fn(lambda: store.load(order).synchronize() or store.offload(order), warmup=2, repeat=args.repeat, device="cpu")
    del roundtrip
    nbytes = num_blocks * spec.bytes_per_block
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    contiguous = time_fn(lambda: dev.copy_(host, non_blocking=True), warmup=2, repeat=args.repeat, device=device)
    s_gbps = nbytes / (scattered.median_ms / 1e3) / 1e9
    c_gbps = nbytes / (contiguous.median_ms / 1e3) / 1e9
    return {"blocks": num_blocks, "bytes": nbytes, "scattered_gbps": s_gbps, "contiguous_gbps": c_gbps, "ratio": s_gbps / c_gbps}


def main(args) -> int:
    from kvstore.spec import KVSpec

    device = resolve_device(args.device)
    spec = KVSpec.preset(args.preset, num_layers=args.layers)
    contexts = args.contexts
    _check_memory(spec, contexts, args, device)
    results = []
    with Progress("bench store", total=len(contexts) + (device.type == "cuda")) as progress:
        for n in contexts:
            progress.step(f"context {n}: append, offload, load x{args.repeat}; {args.decode_steps} decode steps")
            results.append(run_context(spec, n, args, device))
        if device.type == "cuda":
            progress.step("scattered vs contiguous host -> device copy")
            copy = scattered_vs_contiguous(spec, args, device)
    print_table(
        f"kvstore bench store — {args.preset} x{args.layers} layers, {spec.bytes_per_block // 1024} KiB blocks, {device}",
        ["context", "MiB", "append GB/s", "offload GB/s", "load GB/s", "step µs (median)", "step µs (p99)"],
        [
            (r["context"], r["bytes"] / 2**20, r["append_gbps"], r["offload_gbps"], r["load_gbps"],
             r["step_bookkeeping_us"], r["step_bookkeeping_p99_us"])
            for r in results
        ],
    )
    payload = {"machine": machine_info(device), "spec": {"preset": args.preset, "num_layers": args.layers}, "results": results}
    if device.type == "cuda":
        payload["scattered_copy"] = copy
        print(
            f"scattered 16-token blocks H2D: {copy['scattered_gbps']:.1f} GB/s vs contiguous {copy['contiguous_gbps']:.1f} GB/s "
            f"({100 * copy['ratio']:.0f}%, target >= 80%)"
        )
    write_json(args.json_out, payload)
    return 0
