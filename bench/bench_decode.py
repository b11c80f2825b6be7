"""Sparse decode step on one device: PQ search, host fetch and attention against dense SDPA and physical limits.

A model-shaped layer stack (``--preset``, default llama3-8b on CUDA, tiny on CPU) holds
``--contexts`` tokens for each of ``--batch`` sequences: every block lives in a pinned host
pool; a device tier holds ``--device-fraction`` of them. One decode step per layer scores all
tokens from their PQ codes (M=4, 8 bits), keeps sinks + window + top-k within ``--budget``,
loads the selected blocks the device tier misses, and attends to the selected tokens
(kvstore.attn.paged_token_attention). Measured in the same run:

* per layer: PQ search (kvstore backend ``torch`` and, on CUDA, the fused kernel; pqcache_ref's
  scoring ops on the same tensors), attention over the selection, dense SDPA over the whole
  context; the sparse step with every selected block resident against dense SDPA;
* host fetch: scattered 16-token blocks host -> device by each path (memcpy, uva),
  and the hit rate of the device tier (LRU over ``--steps`` decode steps) with its fetch time;
* bandwidths: device copy (HBM) and pinned host -> device copy (PCIe), so that the search reads
  codes at ``code bytes / time / HBM`` and the gather moves ``bytes / time / PCIe``;
* k-means for one layer at the largest context: the torch batched path (on the device), the
  faiss CPU path (where faiss is installed) and pqcache_ref's per-(head, sub-vector) Lloyd,
  against that layer's causal prefill attention (SDPA).

Workload: topic-segment keys generated on the device (segments of mean 48 tokens, 256 Zipf
topics shared by the heads, 4 high-norm sinks); each decode query recalls the current topic
and two earlier ones. Every layer reuses the first layer's K/V and codes (timings do not depend
on the values); per-step figures for the whole model are per-layer times x ``num_layers`` of
the preset (derived, labelled so). Any measurement that fails is recorded as an error and the
run goes on.
"""

from __future__ import annotations

import math
import time
import traceback

from kvstore.errors import ConfigError

from .common import (
    PRESET_NAMES, Progress, add_common_args, fraction, int_list, machine_info, nonnegative_int, positive_int, print_table, resolve_device,
    time_fn, write_json,
)

_GPU_DEFAULTS = {"preset": "llama3-8b", "contexts": "32768,65536,131072", "batch": "1,8"}
_CPU_DEFAULTS = {"preset": "tiny", "contexts": "2048,4096", "batch": "1,2"}


def _auto_or_ints(text: str) -> str | list[int]:
    """``auto`` or comma-separated positive integers."""
    return "auto" if text.strip() == "auto" else int_list(text)


def add_cli_args(parser) -> None:
    parser.add_argument("--preset", default="auto", choices=["auto", *PRESET_NAMES], help="KVSpec preset; auto: llama3-8b on CUDA, tiny on CPU")
    parser.add_argument("--contexts", type=_auto_or_ints, default="auto",
                        help="comma-separated context lengths; auto: 32768,65536,131072 on CUDA, 2048,4096 on CPU")
    parser.add_argument("--batch", type=_auto_or_ints, default="auto", help="comma-separated batch sizes; auto: 1,8 on CUDA, 1,2 on CPU")
    parser.add_argument("--layers", type=positive_int, default=2, help="layers held in each block (the stack's depth in memory)")
    parser.add_argument("--budget", type=fraction, default=1 / 16, help="selected fraction of the context (sinks and window included)")
    parser.add_argument("--sinks", type=nonnegative_int, default=32, help="sink tokens always selected")
    parser.add_argument("--window", type=nonnegative_int, default=128, help="recent tokens always selected")
    parser.add_argument("--device-fraction", type=fraction, default=0.25, help="device tier capacity as a fraction of the context")
    parser.add_argument("--steps", type=positive_int, default=8, help="decode steps of the device-tier (hit rate) simulation")
    parser.add_argument("--gather-blocks", type=int_list, default="64,512,4096", help="scattered block counts of the host gather comparison")
    parser.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed calls before each measurement")
    parser.add_argument("--repeat", type=positive_int, default=10, help="timed calls per measurement")
    parser.add_argument("--skip-kmeans", action="store_true", help="skip the k-means vs prefill comparison")
    parser.add_argument("--skip-pqcache-train", action="store_true", help="skip pqcache_ref's k-means (slow: numpy, one group at a time)")
    add_common_args(parser)


# ------------------------------------------------------------------------------------ helpers
def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _wall_ms(fn, device: torch.device, *, warmup: int, repeat: int) -> float:
    """Median wall-clock ms of ``fn(); synchronize`` (host work included, as a step pays it)."""
    import numpy as np

    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(samples))


def _guard(results: dict, key: str, fn):
    """Run one measurement; record ``{"error": ...}`` under ``key`` instead of aborting the run."""
    try:
        return fn()
    except Exception as exc:  # a failed kernel or OOM must not cost the rest of a GPU session
        results.setdefault("errors", {})[key] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        return None


def _bandwidths(device: torch.device, args) -> dict:
    """Device copy (read + write bytes) and pinned host -> device copy, GB/s."""
    import torch

    nbytes = (1 << 30) if device.type == "cuda" else (1 << 26)
    a = torch.empty(nbytes // 2, dtype=torch.int16, device=device).fill_(1)
    b = torch.empty_like(a)
    t = time_fn(lambda: b.copy_(a), warmup=args.warmup, repeat=args.repeat, device=device)
    out = {"device_copy_GBps": 2 * nbytes / t.median_ms / 1e6, "bytes": nbytes}
    if device.type == "cuda":
        host = torch.empty(nbytes // 2, dtype=torch.int16, pin_memory=True).fill_(1)
        t = time_fn(lambda: b.copy_(host, non_blocking=True), warmup=args.warmup, repeat=args.repeat, device=device)
        out["h2d_pinned_GBps"] = nbytes / t.median_ms / 1e6
        del host
    del a, b
    return out


class _Workload:
    """Topic-segment keys and values of one sequence (see the module docstring), on ``device``."""

    def __init__(self, spec: KVSpec, n: int, seed: int, device: torch.device) -> None:
        import torch

        g = torch.Generator(device=device).manual_seed(seed)
        H, D, T = spec.num_kv_heads, spec.head_dim, 256
        lengths = torch.empty(n, device=device).exponential_(1 / 48, generator=g).long().clamp_min(1)
        seg = torch.searchsorted(torch.cumsum(lengths, 0), torch.arange(n, device=device), right=True)
        zipf = 1.0 / torch.arange(1, T + 1, device=device, dtype=torch.float32) ** 0.8
        topic = torch.multinomial(zipf, int(seg.max()) + 1, replacement=True, generator=g)[seg]  # [n]
        self.topics = torch.randn(H, T, D, device=device, generator=g)
        mu = 0.3 * torch.randn(H, 1, D, device=device, generator=g)
        keys = mu + self.topics[:, topic] + 0.3 * torch.randn(H, n, D, device=device, generator=g)
        keys[:, :4] = 4.0 * torch.randn(H, 1, D, device=device, generator=g)
        self.keys = keys  # [H, n, D] float32
        self.values = torch.randn(H, n, D, device=device, generator=g)
        self.topic = topic
        self.spec, self.g = spec, g

    def query(self) -> torch.Tensor:
        """A decode query ``[Hq, D]`` recalling the current topic and two earlier ones."""
        import torch

        spec, g = self.spec, self.g
        n = self.topic.shape[0]
        recall = self.topic[torch.randint(n, (2,), device=self.topic.device, generator=g)]
        picks = torch.cat([self.topic[-1:], recall])
        q = (self.topics[:, picks] * torch.tensor([1.0, 0.8, 0.6], device=picks.device)[None, :, None]).sum(1)
        q = q * (3.0 / math.sqrt(spec.head_dim))
        q = q.repeat_interleave(spec.group_size, 0)
        return q + 0.1 * q.norm(dim=-1, keepdim=True) * torch.randn(q.shape, device=q.device, generator=g) / math.sqrt(spec.head_dim)


# --------------------------------------------------------------------------------- one config
class _Config:
    """One (context, batch): pools, PQ indexes and per-step measurements."""

    def __init__(self, spec: KVSpec, n: int, batch: int, args, device: torch.device) -> None:
        import torch
        from kvstore.blocks import BlockPool
        from kvstore.pq.index import PQIndex
        from kvstore.pq.kmeans import KMeansConfig

        self.spec, self.n, self.batch, self.args, self.device = spec, n, batch, args, device
        bs = spec.block_size
        self.nb = n // bs
        self.budget = max(1, math.ceil(args.budget * n))
        self.sinks = min(args.sinks, self.budget)
        self.window = min(args.window, self.budget - self.sinks)
        self.topk = self.budget - self.sinks - self.window
        self.scale = 1.0 / math.sqrt(spec.head_dim)
        H, D = spec.num_kv_heads, spec.head_dim
        pin = device.type == "cuda"
        self.host = BlockPool(spec, batch * self.nb, device="cpu", pin_memory=pin, name="host")
        self.codes = torch.empty((batch * H, n, 4), dtype=torch.uint8, device=device)
        self.centroids = torch.empty((batch * H, 4, 256, D // 4), dtype=torch.float32, device=device)
        self.dense_k = torch.empty((batch, H, n, D), dtype=spec.dtype, device=device)
        self.dense_v = torch.empty_like(self.dense_k)
        self.queries = []
        for b in range(batch):
            w = _Workload(spec, n, args.seed * 7919 + b, device)
            index = PQIndex(D, 4, 8, kmeans=KMeansConfig(seed=args.seed))
            index.train(w.keys)
            index.add(w.keys)
            self.codes[b * H : (b + 1) * H] = index.codes
            self.centroids[b * H : (b + 1) * H] = index.centroids
            k = w.keys.transpose(0, 1).to(spec.dtype)  # [n, H, D]
            v = w.values.transpose(0, 1).to(spec.dtype)
            self.dense_k[b] = w.keys.to(spec.dtype)
            self.dense_v[b] = w.values.to(spec.dtype)
            rows = slice(b * self.nb, (b + 1) * self.nb)
            for layer in range(spec.num_layers):
                self.host.kv[rows, layer, 0] = k.reshape(self.nb, bs, H, D).cpu()
                self.host.kv[rows, layer, 1] = v.reshape(self.nb, bs, H, D).cpu()
            self.queries.append(torch.stack([w.query() for _ in range(args.steps)]))  # [steps, Hq, D]
            del w, index
        self.queries = torch.stack(self.queries, 1)  # [steps, B, Hq, D]
        self.lo = torch.full((batch * H,), self.sinks, dtype=torch.int64, device=device)
        self.hi = torch.full((batch * H,), n - self.window, dtype=torch.int64, device=device)

    # ---- search
    def tables(self, step: int) -> torch.Tensor:
        from kvstore.pq.adc import lookup_tables

        spec = self.spec
        q = self.queries[step].reshape(self.batch * spec.num_kv_heads, spec.group_size, spec.head_dim)
        return lookup_tables(q, self.centroids)

    def search(self, step: int, backend: str) -> torch.Tensor:
        """Top-k ``[B*Hkv, topk]`` of one layer (tables included)."""
        from kvstore.pq.adc import adc_topk
        from kvstore.pq.search_cuda import adc_topk_cuda

        fn = adc_topk_cuda if backend == "cuda" else adc_topk
        return fn(self.codes, self.tables(step), self.topk, lo=self.lo, hi=self.hi, aggregate="sum", scale=self.scale)

    def positions(self, top: torch.Tensor) -> torch.Tensor:
        """Sinks + window + top-k -> sorted int32 ``[B, Hkv, budget]``."""
        import torch

        B, H = self.batch, self.spec.num_kv_heads
        fixed = torch.cat([torch.arange(self.sinks, device=top.device), torch.arange(self.n - self.window, self.n, device=top.device)])
        pos = torch.cat([fixed.expand(B * H, -1), top], 1).sort(1).values
        return pos.view(B, H, -1).to(torch.int32)

    # ---- attention
    def attend(self, step: int, pool: BlockPool, tables: torch.Tensor, positions: torch.Tensor) -> None:
        from kvstore.attn import paged_token_attention

        q = self.queries[step].to(self.spec.dtype)
        for b in range(self.batch):
            paged_token_attention(
                q[b][None], pool.layer_view(0, 0), pool.layer_view(0, 1), tables[b], positions[b],
                seq_len=self.n, check_indices=False,
            )

    def dense(self, step: int) -> torch.Tensor:
        import torch.nn.functional as F

        q = self.queries[step].to(self.spec.dtype)[:, :, None]  # [B, Hq, 1, D]
        return F.scaled_dot_product_attention(q, self.dense_k, self.dense_v, enable_gqa=True)

    def pqcache_search(self, ref: PQCacheRef, step: int) -> torch.Tensor:
        """pqcache_ref's scoring ops (gather of int64 codes, softmax, GQA sum, top-k) on this device."""
        import torch

        H, m, k, dsub = ref.centroids.shape
        q = self.queries[step].float().view(self.batch, H, -1, m, dsub).transpose(2, 3)  # [B, H, m, G, dsub]
        table = torch.matmul(q, ref.centroids.transpose(-1, -2))  # [B, H, m, G, k]
        G = table.shape[3]
        n_cand = ref.codes.shape[-1]
        codes = ref.codes.unsqueeze(3).expand(self.batch, H, m, G, n_cand)
        weight = torch.gather(table, 4, codes).sum(2)  # [B, H, G, n_cand]
        score = torch.softmax(weight / math.sqrt(self.spec.head_dim), dim=-1).sum(2)
        return score.topk(self.topk, dim=-1, sorted=False).indices


def _run_config(cfg: _Config, args, device: torch.device, bw: dict) -> dict:
    import numpy as np
    import torch
    from kvstore.blocks import BlockPool
    from kvstore.transfer import BlockMover
    from .baselines.pqcache_ref import PQCacheRef

    spec, B, H, n = cfg.spec, cfg.batch, cfg.spec.num_kv_heads, cfg.n
    out: dict = {"context": n, "batch": B, "budget_tokens": cfg.budget, "topk": cfg.topk}
    timing = dict(warmup=args.warmup, repeat=args.repeat, device=device)
    code_bytes = B * H * n * 4
    out["code_bytes"] = code_bytes

    backends = ["torch", "cuda"] if device.type == "cuda" else ["torch"]
    for backend in backends:
        t = _guard(out, f"search_{backend}", lambda: time_fn(lambda: cfg.search(0, backend), **timing).median_ms)
        if t is not None:
            out[f"search_{backend}_ms"] = t
            if device.type == "cuda":
                out[f"search_{backend}_hbm_fraction"] = code_bytes / t / 1e6 / bw["device_copy_GBps"]
    if device.type == "cuda" and "search_cuda_ms" in out:
        _guard(out, "search_cuda_vs_torch", lambda: _check_search(cfg, out))

    # pqcache_ref's selector ops on the same shapes: m=2, 6 bits, int64 codes over the candidates
    ref = PQCacheRef(spec.head_dim)
    g = torch.Generator(device=device).manual_seed(args.seed)
    ref.centroids = torch.randn(H, 2, 64, spec.head_dim // 2, device=device, generator=g)
    ref.codes = torch.randint(0, 64, (B, H, 2, n - ref.sink_size - (cfg.budget - ref.sink_size) // 2), device=device, generator=g)
    t = _guard(out, "search_pqcache_ref", lambda: time_fn(lambda: cfg.pqcache_search(ref, 0), **timing).median_ms)
    if t is not None:
        out["search_pqcache_ref_ms"] = t
        best = min(out.get(f"search_{b}_ms", math.inf) for b in backends)
        out["search_speedup_vs_pqcache_ref"] = t / best
    del ref

    best_backend = min(backends, key=lambda b: out.get(f"search_{b}_ms", math.inf))
    # every block resident: a device pool holding the whole context
    full = _guard(out, "full_pool", lambda: BlockPool(spec, B * cfg.nb, device=device, name="device"))
    if full is not None:
        BlockMover(device).copy(cfg.host, np.arange(B * cfg.nb), full, np.arange(B * cfg.nb)).synchronize()
        table = torch.arange(B * cfg.nb, dtype=torch.int32, device=device).view(B, cfg.nb)
        pos = cfg.positions(cfg.search(0, best_backend))
        t = _guard(out, "attention", lambda: time_fn(lambda: cfg.attend(0, full, table, pos), **timing).median_ms)
        if t is not None:
            out["attention_ms"] = t
        t = _guard(out, "dense_sdpa", lambda: time_fn(lambda: cfg.dense(0), **timing).median_ms)
        if t is not None:
            out["dense_sdpa_ms"] = t
        if "attention_ms" in out and "dense_sdpa_ms" in out and f"search_{best_backend}_ms" in out:
            step = out[f"search_{best_backend}_ms"] + out["attention_ms"]
            out["sparse_step_resident_ms"] = step
            out["sparse_vs_dense_speedup"] = out["dense_sdpa_ms"] / step
        del full
    _guard(out, "device_tier", lambda: _device_tier(cfg, args, device, best_backend, out))
    return out


def _check_search(cfg: _Config, out: dict) -> None:
    """Fraction of the kernel's picks that the torch reference also picks (1.0 up to ties)."""
    import torch

    a = cfg.search(0, "cuda").sort(1).values
    b = cfg.search(0, "torch").sort(1).values
    same = sum(int(torch.isin(a[r], b[r]).sum()) for r in range(a.shape[0]))
    out["search_cuda_agreement"] = same / a.numel()


def _device_tier(cfg: _Config, args, device: torch.device, backend: str, out: dict) -> None:
    """An LRU device tier of ``device_fraction`` x context per sequence over ``--steps`` decode
    steps: hit rate of the selected blocks, fetch time and the whole step (search, fetch, attention)."""
    import numpy as np
    import torch
    from kvstore.blocks import BlockPool
    from kvstore.transfer import BlockMover

    B, nb, spec = cfg.batch, cfg.nb, cfg.spec
    cap = max(1, int(args.device_fraction * nb))
    pool = BlockPool(spec, B * cap, device=device, name="device")
    mover = BlockMover(device, h2d_path="auto" if device.type == "cuda" else None)
    slot_of = np.full((B, nb), -1, dtype=np.int64)  # device slot of each block, -1 on the host only
    last_use = np.zeros((B, nb), dtype=np.int64)
    head = min(cap // 2, nb)
    warm = np.concatenate([np.arange(head), np.arange(nb - (cap - head), nb)])  # sinks' end and the recent end
    for b in range(B):
        slot_of[b, warm] = b * cap + np.arange(warm.size)
        mover.copy(cfg.host, b * nb + warm, pool, b * cap + np.arange(warm.size)).synchronize()
    hits = total = fetched = overflow = 0
    fetch_ms, step_ms = [], []
    for step in range(args.steps):
        _sync(device)
        t0 = time.perf_counter()
        pos = cfg.positions(cfg.search(step, backend))
        pos_host = pos.cpu().numpy()
        t1 = time.perf_counter()
        src, dst = [], []
        for b in range(B):
            blocks = np.unique(pos_host[b] // spec.block_size)
            miss = blocks[slot_of[b, blocks] < 0]
            hits += blocks.size - miss.size
            total += blocks.size
            last_use[b, blocks] = step + 1
            resident = np.flatnonzero(slot_of[b] >= 0)
            used = np.zeros(cap, dtype=bool)
            used[slot_of[b, resident] - b * cap] = True
            free = b * cap + np.flatnonzero(~used)
            evictable = resident[~np.isin(resident, blocks)]
            victims = evictable[np.argsort(last_use[b, evictable], kind="stable")][: max(0, miss.size - free.size)]
            slots = np.concatenate([free, slot_of[b, victims]])[: miss.size]
            slot_of[b, victims] = -1
            take = miss[: slots.size]
            overflow += miss.size - take.size  # selected blocks beyond the tier's capacity
            slot_of[b, take] = slots
            src.append(b * nb + take)
            dst.append(slots)
        src_a, dst_a = np.concatenate(src), np.concatenate(dst)
        if src_a.size:
            mover.copy(cfg.host, src_a, pool, dst_a).wait()
        fetched += src_a.size
        _sync(device)
        t2 = time.perf_counter()
        if not overflow:
            table = torch.from_numpy(np.where(slot_of >= 0, slot_of, 0).astype(np.int32)).to(device)
            cfg.attend(step, pool, table, pos)
            _sync(device)
        t3 = time.perf_counter()
        if step > 0:  # step 0 warms the caches
            fetch_ms.append((t2 - t1) * 1e3)
            step_ms.append((t3 - t0) * 1e3)
    out["device_tier"] = {
        "fraction": args.device_fraction,
        "blocks_per_seq": cap,
        "hit_rate": hits / max(1, total),
        "blocks_fetched_per_step": fetched / args.steps,
        "bytes_fetched_per_step": fetched / args.steps * spec.bytes_per_block,
        "selected_blocks_beyond_capacity": int(overflow),
        "fetch_ms_median": float(np.median(fetch_ms)) if fetch_ms else None,
        # search + fetch + attention, wall clock; without attention when the selection overflows the tier
        "step_ms_median": float(np.median(step_ms)) if step_ms else None,
    }


def _gather(spec: KVSpec, args, device: torch.device, bw: dict) -> list[dict]:
    """Scattered host -> device block copies by every path."""
    import numpy as np
    import torch
    from kvstore.blocks import BlockPool
    from kvstore.transfer import BlockMover, H2D_PATHS

    counts = args.gather_blocks
    rows = []
    n_host = 2 * max(counts)
    host = BlockPool(spec, n_host, device="cpu", pin_memory=device.type == "cuda", name="host")
    host.kv.view(torch.uint8).fill_(3)
    dev = BlockPool(spec, max(counts), device=device, name="device")
    rng = np.random.default_rng(args.seed)
    paths = list(H2D_PATHS) if device.type == "cuda" else ["memcpy"]
    for count in counts:
        src = rng.choice(n_host, count, replace=False)
        dst = rng.permutation(count)
        for path in paths:
            mover = BlockMover(device, h2d_path=path)
            row = {"blocks": count, "path": path, "bytes": count * spec.bytes_per_block}
            t = _guard(row, "copy", lambda: _wall_ms(lambda: mover.copy(host, src, dev, dst).synchronize(), device, warmup=args.warmup, repeat=args.repeat))
            if t is not None:
                row["ms"] = t
                row["GBps"] = row["bytes"] / t / 1e6
                if "h2d_pinned_GBps" in bw:
                    row["pcie_fraction"] = row["GBps"] / bw["h2d_pinned_GBps"]
            rows.append(row)
    del host, dev
    return rows


def _kmeans(spec: KVSpec, n: int, args, device: torch.device) -> dict:
    """One layer: k-means of every (head, subspace) by the torch path on ``device``, faiss (CPU) and
    pqcache_ref, next to the layer's causal prefill attention."""
    import torch.nn.functional as F
    import torch
    from kvstore.pq.index import PQIndex
    from kvstore.pq.kmeans import KMeansConfig, kmeans
    from .baselines.pqcache_ref import PQCacheRef

    out: dict = {"tokens": n}
    H, D, M = spec.num_kv_heads, spec.head_dim, 4
    w = _Workload(spec, n, args.seed, device)
    x = w.keys.reshape(H, n, M, D // M).permute(0, 2, 1, 3).reshape(H * M, n, D // M)
    cfg = KMeansConfig(seed=args.seed)
    t = _guard(out, "torch", lambda: _wall_ms(lambda: kmeans(x, 256, cfg), device, warmup=1, repeat=3))
    if t is not None:
        out["kmeans_torch_ms"] = t
    index = PQIndex(D, M, 8, kmeans=cfg)
    t = _guard(out, "train_add", lambda: _wall_ms(lambda: (index.train(w.keys), index.add(w.keys)), device, warmup=1, repeat=3))
    if t is not None:
        out["train_and_encode_torch_ms"] = t
    try:
        import faiss  # noqa: F401  (lazy: the GPU box has no faiss)

    except ImportError:
        out["kmeans_faiss_cpu_ms"] = None
        out["kmeans_faiss_note"] = "faiss not installed on this machine"
    else:
        xc = x.cpu()
        t = _guard(out, "faiss", lambda: _wall_ms(lambda: kmeans(xc, 256, KMeansConfig(backend="faiss", seed=args.seed)), torch.device("cpu"), warmup=0, repeat=1))
        if t is not None:
            out["kmeans_faiss_cpu_ms"] = t
    if not args.skip_pqcache_train:
        ref = PQCacheRef(D)
        keys = w.keys.cpu()
        t = _guard(out, "pqcache_ref", lambda: _wall_ms(lambda: ref.train(keys), torch.device("cpu"), warmup=0, repeat=1))
        if t is not None:
            out["kmeans_pqcache_ref_cpu_ms"] = t
    q = torch.randn(1, spec.num_q_heads, n, D, device=device, dtype=spec.dtype)
    k = w.keys.to(spec.dtype)[None]
    v = w.values.to(spec.dtype)[None]
    del w, x
    t = _guard(out, "prefill", lambda: _wall_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), device, warmup=1, repeat=2))
    if t is not None:
        out["prefill_attention_ms"] = t
        if "train_and_encode_torch_ms" in out:
            out["kmeans_fraction_of_prefill"] = out["train_and_encode_torch_ms"] / t
    return out


# --------------------------------------------------------------------------------------- main
def _resolve(args, device: torch.device) -> tuple[KVSpec, int, list[int], list[int]]:
    """The spec (``--layers`` deep), the preset's real depth, the contexts and the batch sizes."""
    from kvstore.spec import KVSpec

    defaults = _GPU_DEFAULTS if device.type == "cuda" else _CPU_DEFAULTS
    pick = lambda name: defaults[name] if getattr(args, name) == "auto" else getattr(args, name)  # noqa: E731
    preset = KVSpec.preset(pick("preset"))
    contexts = int_list(pick("contexts")) if args.contexts == "auto" else args.contexts
    batches = int_list(pick("batch")) if args.batch == "auto" else args.batch
    bad = [c for c in contexts if c % preset.block_size or c < 2 * (args.sinks + args.window)]
    if bad:
        raise ConfigError(f"--contexts {bad}: each must be a multiple of {preset.block_size} and >= {2 * (args.sinks + args.window)}")
    return preset.replace(num_layers=args.layers), preset.num_layers, contexts, batches


def main(args) -> int:
    import torch

    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    spec, model_layers, contexts, batches = _resolve(args, device)
    started = time.perf_counter()
    config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}
    results: dict = {
        "config": {**config, "spec": repr(spec), "contexts": contexts, "batches": batches, "model_layers": model_layers},
        "machine": machine_info(device),
    }
    with Progress("bench decode", total=2 + len(contexts) * len(batches) + (not args.skip_kmeans)) as progress:
        progress.step("bandwidths")
        bw = _bandwidths(device, args)
        results["bandwidth"] = bw
        progress.step(f"host -> device gather of {','.join(map(str, args.gather_blocks))} scattered blocks")
        results["gather"] = _guard(results, "gather", lambda: _gather(spec, args, device, bw))
        results["steps"] = []
        for n in contexts:
            for B in batches:
                progress.step(f"context {n}, batch {B}: search, attention, dense SDPA, {args.steps}-step device tier")
                row = _guard(results, f"config_{n}_{B}", lambda: _run_config(_Config(spec, n, B, args, device), args, device, bw))
                if row is not None:
                    results["steps"].append(row)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if not args.skip_kmeans:
            progress.step(f"k-means of one layer at {max(contexts)} tokens")
            results["kmeans"] = _guard(results, "kmeans", lambda: _kmeans(spec, max(contexts), args, device))
    results["wall_s"] = time.perf_counter() - started

    print_table(
        f"Bandwidth ({device})", ["name", "GB/s"],
        [[k, v] for k, v in bw.items() if k.endswith("GBps")],
    )
    if results["gather"]:
        print_table(
            "Host -> device gather of scattered blocks", ["blocks", "path", "MB", "ms", "GB/s", "PCIe fraction"],
            [[r["blocks"], r["path"], r["bytes"] / 1e6, r.get("ms"), r.get("GBps"), r.get("pcie_fraction")] for r in results["gather"]],
        )
    cols = ["context", "batch", "search torch", "search cuda", "pqcache_ref", "HBM frac", "attn", "dense SDPA", "sparse/dense x",
            "hit rate", "fetch ms", "tier step", f"step x{model_layers} (ms)"]
    rows = []
    for r in results["steps"]:
        tier = r.get("device_tier", {})
        per_layer = r.get("sparse_step_resident_ms")
        rows.append([
            r["context"], r["batch"], r.get("search_torch_ms"), r.get("search_cuda_ms"), r.get("search_pqcache_ref_ms"),
            r.get("search_cuda_hbm_fraction"), r.get("attention_ms"), r.get("dense_sdpa_ms"), r.get("sparse_vs_dense_speedup"),
            tier.get("hit_rate"), tier.get("fetch_ms_median"), tier.get("step_ms_median"), None if per_layer is None else per_layer * model_layers,
        ])
    print_table("Sparse decode step per layer (ms; the last column: x model layers, derived)", cols, rows)
    if results.get("kmeans"):
        km = results["kmeans"]
        print_table(
            f"k-means, one layer of {km['tokens']} tokens (ms)", ["name", "ms"],
            [[k, v] for k, v in km.items() if k.endswith("_ms") or k.endswith("prefill")],
        )
    if results.get("errors"):
        print_table("Measurements that failed", ["name", "error"], list(results["errors"].items()))
    write_json(args.json_out, results)
    return 0
