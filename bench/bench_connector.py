"""vLLM connector: scheduler-side overhead per request per step, and host-tier save/load bandwidth.

Scheduler side: a host tier holding ``--cached-blocks`` blocks (keys as vLLM's 32-byte hashes);
``--requests`` requests decode (build_connector_meta per step) and as many are admitted with a
``--hit-blocks``-block prefix hit (get_num_new_matched_tokens + update_state_after_alloc). The
vLLM objects those methods read (Request, KVCacheBlocks, SchedulerOutput) are stand-ins with
the same attributes, so the figure is the connector's own cost. Worker side: save then load of
``--copy-blocks`` vLLM blocks between per-layer KV caches in vLLM's layout and the host pool,
against a plain ``copy_`` of the same bytes.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import torch

from .common import add_common_args, machine_info, print_table, resolve_device, time_fn, write_json


def add_cli_args(parser) -> None:
    parser.add_argument("--cached-blocks", type=int, default=10_000, help="blocks resident in the host tier")
    parser.add_argument("--requests", type=int, default=64, help="requests per step")
    parser.add_argument("--hit-blocks", type=int, default=64, help="prefix hit of each admitted request (blocks)")
    parser.add_argument("--policy", default="asym", help="host tier eviction policy")
    parser.add_argument("--copy-blocks", type=int, default=64, help="vLLM blocks per save/load")
    parser.add_argument("--layers", type=int, default=8, help="layers of the bandwidth model (llama3-8b heads/dims)")
    parser.add_argument("--repeat", type=int, default=20, help="timed repetitions")
    add_common_args(parser)


def _key(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "little", signed=True)).digest()


def _scheduler_bench(args) -> dict:
    from kvstore.evict.cost import CostModel
    from kvstore.integrations.vllm import KVStoreConnectorConfig, _SchedulerSide
    from kvstore.spec import KVSpec

    spec = KVSpec.preset("llama3-8b")
    side = _SchedulerSide(
        KVStoreConnectorConfig(host_blocks=args.cached_blocks + 4 * args.requests * args.hit_blocks, policy=args.policy),
        spec, spec.block_size, CostModel.preset("llama3-8b"),
    )
    idx = side.index
    prefixes = args.cached_blocks // args.hit_blocks
    for p in range(prefixes):
        keys = [_key(p * 1_000_003 + j) for j in range(args.hit_blocks)]
        idx.insert(keys, [j * spec.block_size for j in range(args.hit_blocks)])
    assert len(idx) == prefixes * args.hit_blocks
    rng = np.random.default_rng(args.seed)
    bs, R, H = spec.block_size, args.requests, args.hit_blocks

    def request(rid: str, p: int):
        hashes = [_key(p * 1_000_003 + j) for j in range(H)] + [_key(-1 - j - 7919 * int(rid[1:])) for j in range(4)]
        n = (H + 4) * bs + 3
        return SimpleNamespace(request_id=rid, block_hashes=hashes, num_tokens=n, num_prompt_tokens=n, num_computed_tokens=0)

    arrivals = [request(f"n{i}", int(rng.integers(prefixes))) for i in range(R)]  # hashing is vLLM's cost, not timed

    def admit():
        for req in arrivals:
            ext, _ = side.get_num_new_matched_tokens(req, 0)
            blocks = SimpleNamespace(get_block_ids=lambda n=H + 5: ([*range(n)],))
            side.update_state_after_alloc(req, blocks, ext)
        so = SimpleNamespace(
            scheduled_new_reqs=[], num_scheduled_tokens={},
            scheduled_cached_reqs=SimpleNamespace(req_ids=[], new_block_ids=[], resumed_req_ids=set(), num_computed_tokens=[]),
        )
        side.build_connector_meta(so)
        side.reqs.clear()

    running = [request(f"r{i}", i % prefixes) for i in range(R)]
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
        "cached_blocks": len(idx),
        "requests_per_step": R,
        "hit_blocks": H,
        "decode_us_per_request": t_decode.median_ms * 1e3 / R,
        "admit_us_per_request": t_admit.median_ms * 1e3 / R,
    }


def _bandwidth_bench(args, device: torch.device) -> dict:
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
    sched = _scheduler_bench(args)
    bw = _bandwidth_bench(args, device)
    rows = [
        ["scheduler: decode step (build_connector_meta)", f"{sched['decode_us_per_request']:.2f} us/request", "<= 50 us"],
        ["scheduler: admit with prefix hit (lookup+alloc+meta)", f"{sched['admit_us_per_request']:.2f} us/request", "<= 50 us"],
        [f"worker save ({bw['blocks']} blocks, {bw['bytes'] / 2**20:.0f} MiB, {device.type})", f"{bw['save_gbps']:.2f} GB/s", ""],
        [f"worker load ({device.type})", f"{bw['load_gbps']:.2f} GB/s", ""],
        ["plain copy_ of the same bytes", f"{bw['plain_copy_gbps']:.2f} GB/s", "reference"],
    ]
    print_table(f"connector ({sched['cached_blocks']} blocks cached, {sched['requests_per_step']} requests/step)", ["measure", "value", "target"], rows)
    write_json(args.json_out, {"machine": machine_info(device), "device": str(device), "policy": args.policy, "scheduler": sched, "bandwidth": bw})
    return 0
