"""Long-context decode, mode by mode: full attention, kvstore PQ selection, PQCache's selector, lossless tiers.

One model-shaped workload (a KVSpec preset; queries, keys and values from kvstore's synthetic
generator: RoPE, outlier channels, sinks, locality, planted needles) is prefilled into a
KVStore in chunks, then decoded for N steps. Each decode step appends the new token's K/V to
every layer and attends, per layer, in one of six modes:

  full         dense attention over every token, all KV on the device tier (the reference)
  pq           kvstore's selection: its PQ index scores every token (ADC over uint8 codes),
               a shortlist of ``--refine`` x the top-k plus the index's outliers is re-scored
               with the exact keys, read where their blocks lie (their cost is in the select
               column), and sinks + recent window + the top-k fill the budget; the selected
               blocks are fetched from the host tier into a device tier that holds half the
               context; attention reads each KV head's tokens in place
  pq-codes     pq scored from the codes alone (no re-ranking): PQCache's cost, kvstore's index
  exact        the oracle: sinks + window + the top-k by exact scores over every key (the
               ceiling of any selector at this budget; its select time reads all keys)
  pqcache-ref  PQCache's published selector at the same budget, same fetch and attention
  lossless     a device tier of 25% of the context and a host tier of 50%; the rest is dropped
               and recomputed on use; attention over every token through multi-segment
               attention, merging per-chunk results by log-sum-exp, so the output equals full's

A batch (``--batch``) shares the tiers and is decoded together: every step appends one token
to each sequence, kvstore's selection scores the batch in one call per layer (pqcache-ref
selects sequence by sequence, as PQCache does), and attention runs per sequence.

Columns: tpot_ms = median time per output token, i.e. of one decode step of the batch (all
layers: append + select + fetch + attention); select/fetch/attn = its parts, mean per step; recall = recall@k against the exact top-k of q.K
(k = the budget); attention_mass = exact softmax probability held by the selected tokens;
rel_error = relative L2 error of the attention output against full; needle_hit_rate = planted
needles selected when asked for; device/host bytes = KV (and PQ codes) held per tier.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from kvstore.attn import merge_states, paged_attention, paged_token_attention
from kvstore.attn.segments import BlockSegments
from kvstore.pq import metrics
from kvstore.pq.index import PQIndex
from kvstore.pq.select import SelectionConfig, resolve_budget, select_tokens
from kvstore.pq.synthetic import SyntheticConfig, SyntheticWorkload
from kvstore.spec import KVSpec
from kvstore.store import KVStore

from .baselines.pqcache_ref import PQCacheRef
from .common import add_common_args, machine_info, print_table, resolve_device, write_json

MODES = ("full", "pq", "pq-codes", "exact", "pqcache-ref", "lossless")
SELECTING = ("pq", "pq-codes", "exact", "pqcache-ref")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    add_common_args(parser)
    parser.add_argument("--preset", default=None, help="KVSpec preset (default: tiny on CPU, llama3-8b on CUDA)")
    parser.add_argument("--layers", type=int, default=None, help="layers kept from the preset (default: all for tiny, 2 otherwise)")
    parser.add_argument("--contexts", default=None, help="comma-separated prompt lengths (default: 8192,32768 on CPU; 32768,131072 on CUDA)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per context")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together, one token each per step (each its own workload seed)")
    parser.add_argument("--chunk", type=int, default=4096, help="prefill chunk size in tokens")
    parser.add_argument("--budget", type=float, default=1 / 16, help="PQ token budget as a fraction of the context (or tokens if >= 1)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated modes out of {', '.join(MODES)}")
    parser.add_argument("--subspaces", type=int, default=4, help="PQ sub-vectors per head (kvstore)")
    parser.add_argument("--bits", type=int, default=8, help="PQ bits per code (kvstore)")
    parser.add_argument("--sinks", type=int, default=SelectionConfig.num_sinks, help="sink tokens always kept (pq, pq-codes, exact)")
    parser.add_argument("--window", type=int, default=SelectionConfig.recent_window, help="recent tokens always kept (pq, pq-codes, exact)")
    parser.add_argument("--refine", type=float, default=4.0, help="shortlist factor of pq's exact re-ranking (1: codes only, as pq-codes)")
    parser.add_argument("--plot", default=None, metavar="OUT.png", help="plot TPOT and quality against context")


# ---------------------------------------------------------------------------------------------
@dataclass
class ModeStats:
    """What one mode measured over one context."""

    step_ms: list[float] = field(default_factory=list)
    select_ms: float = 0.0
    fetch_ms: float = 0.0
    attn_ms: float = 0.0
    recall: list[float] = field(default_factory=list)
    mass: list[float] = field(default_factory=list)
    rel_error: list[float] = field(default_factory=list)
    needles: list[float] = field(default_factory=list)
    device_bytes: int = 0
    host_bytes: int = 0


class _Clock:
    """Accumulates wall time of named phases (synchronising CUDA around each)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = {"select": 0.0, "fetch": 0.0, "attn": 0.0, "append": 0.0}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.totals[phase] += (time.perf_counter() - t0) * 1e3


class _Workload(NamedTuple):
    """One sequence's synthetic data: keys/values ``[L, Hkv, T, D]``, queries ``[L, S, Hq, D]``,
    needle positions and the decode step that asks for each."""

    cfg: SyntheticConfig
    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    needles: torch.Tensor
    needle_steps: torch.Tensor


def _workload(spec: KVSpec, context: int, steps: int, seed: int, device: torch.device) -> _Workload:
    cfg = SyntheticConfig(
        num_kv_heads=spec.num_kv_heads, group_size=spec.group_size, head_dim=spec.head_dim,
        prompt_len=context, num_decode=steps, num_needles=min(8, steps), seed=seed,
    )
    wl = SyntheticWorkload(cfg)
    layers = [wl.layer(layer) for layer in range(spec.num_layers)]
    keys = torch.stack([ld.keys for ld in layers]).to(spec.dtype).to(device)
    values = torch.stack([ld.values for ld in layers]).to(spec.dtype).to(device)
    queries = torch.stack([ld.queries for ld in layers]).to(spec.dtype).to(device)
    return _Workload(cfg, keys, values, queries, layers[0].needle_positions, layers[0].needle_steps)


def _prefill(store: KVStore, keys: torch.Tensor, values: torch.Tensor, n: int, chunk: int) -> int:
    """Append the first ``n`` tokens (``keys, values: [L, Hkv, T, D]``) in chunks; returns the sequence id."""
    seq = store.create()
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        store.append(seq, keys[:, :, start:end].transpose(1, 2), values[:, :, start:end].transpose(1, 2))
    return seq


def _append_token(store: KVStore, seq: int, keys, values, pos: int) -> None:
    store.append(seq, keys[:, :, pos : pos + 1].transpose(1, 2), values[:, :, pos : pos + 1].transpose(1, 2))


def _dense_segments(store: KVStore, ids: np.ndarray, num_tokens: int) -> BlockSegments:
    """Segments covering blocks ``ids`` of a sequence with ``num_tokens`` tokens: the full blocks as
    one segment and the partial tail block (if among them) as its own."""
    bs = store.spec.block_size
    tail_index = (num_tokens - 1) // bs
    tail_tokens = num_tokens - tail_index * bs
    table = store.blocks
    runs, last = [], []
    is_tail = table.position[ids] // bs == tail_index
    full = ids[~is_tail]
    if full.size:
        runs.append(table.dev_slot[full])
        last.append(bs)
    if is_tail.any():
        runs.append(table.dev_slot[ids[is_tail]])
        last.append(tail_tokens)
    return BlockSegments.from_runs(runs, last, block_size=bs, device=store.device)


def _attend_all(store: KVStore, seq: int, layer: int, q: torch.Tensor, num_tokens: int, clock: _Clock):
    """Attention of ``q: [1, Hq, D]`` over every token, bringing blocks in chunk by chunk (lossless)."""
    ids = store.block_table(seq).numpy()
    resident = store.blocks.dev_slot[ids] >= 0
    order = np.concatenate([ids[resident], ids[~resident]])  # what is on the device first
    room = store.device_pool.num_slots
    k_cache, v_cache = store.device_pool.layer_view(layer, 0), store.device_pool.layer_view(layer, 1)
    outs, lses = [], []
    for start in range(0, order.size, room):
        chunk = order[start : start + room]
        with clock("fetch"):
            store.ensure_resident(chunk)
        with clock("attn"):
            out, lse = paged_attention(q, k_cache, v_cache, _dense_segments(store, chunk, num_tokens), causal_last=False)
        outs.append(out)
        lses.append(lse)
    if len(outs) == 1:
        return outs[0]
    with clock("attn"):
        out, _ = merge_states(torch.stack(outs, 1), torch.stack(lses, 1))
    return out


def _attend_selected(store: KVStore, seq: int, layer: int, q: torch.Tensor, positions: torch.Tensor, clock: _Clock):
    """Fetch the blocks holding ``positions: [Hkv, S]`` and attend to those tokens per KV head.

    When the selection spans more blocks than the device tier holds, the blocks are fetched in
    chunks that fit and each KV head's partial results are merged by log-sum-exp.
    """
    bs = store.spec.block_size
    table = store.block_table(seq)
    need = torch.unique(positions.cpu() // bs)
    k_cache, v_cache = store.device_pool.layer_view(layer, 0), store.device_pool.layer_view(layer, 1)
    if need.numel() <= store.device_pool.num_slots:
        with clock("fetch"):
            store.ensure_resident(table[need])
        with clock("attn"):
            out, _ = paged_token_attention(
                q, k_cache, v_cache, store.device_block_table(seq), positions.to(torch.int32), check_indices=False
            )
        return out
    heads = positions.shape[0]
    group = q.shape[1] // heads
    parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(heads)]
    for chunk in need.split(store.device_pool.num_slots):
        with clock("fetch"):
            store.ensure_resident(table[chunk])
        with clock("attn"):
            block_table = store.device_block_table(seq)
            in_chunk = torch.isin(positions.cpu() // bs, chunk).to(positions.device)
            for h in range(heads):
                mine = positions[h][in_chunk[h]]
                if mine.numel():
                    parts[h].append(paged_token_attention(
                        q[:, h * group : (h + 1) * group], k_cache[:, :, h : h + 1], v_cache[:, :, h : h + 1],
                        block_table, mine.view(1, -1).to(torch.int32), check_indices=False,
                    ))
    with clock("attn"):
        merged = [merge_states(torch.stack([o for o, _ in p], 1), torch.stack([l for _, l in p], 1))[0] for p in parts]
    return torch.cat(merged, dim=1)


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def _store_for(mode: str, spec: KVSpec, blocks: int, device: torch.device, truth: dict[int, torch.Tensor]) -> KVStore:
    """The tiers of one mode for sequences of ``blocks`` blocks in all; ``truth`` (filled by the
    caller: sequence id -> ``[L, 2, T, Hkv, D]``) is what lossless recomputes from."""
    if mode == "full":
        return KVStore(spec, device_blocks=blocks, device=device)
    if mode == "lossless":
        return KVStore(
            spec, device_blocks=max(2, blocks // 4), host_blocks=max(1, blocks // 2), device=device,
            recompute=lambda s, start, n: truth[s][:, :, start : start + n],
        )
    return KVStore(spec, device_blocks=max(2, blocks // 2), host_blocks=blocks, device=device)


def _index_for(mode: str, spec: KVSpec, keys: torch.Tensor, args):
    """A trained selector over ``keys: [Hkv, N, D]`` (kvstore's PQIndex or PQCache's)."""
    if mode == "pqcache-ref":
        index = PQCacheRef(spec.head_dim)
        index.train(keys.float().cpu())
        return index
    index = PQIndex(spec.head_dim, args.subspaces, args.bits)
    index.train(keys.float())
    index.add(keys.float())
    return index


def run_context(spec: KVSpec, context: int, args, device: torch.device, modes: list[str]) -> list[dict]:
    """Every mode over one context; a batch of ``args.batch`` sequences (each its own workload
    seed) shares the store's tiers and is decoded together: each step appends one token to every
    sequence, and kvstore's selection scores the whole batch in one call per layer."""
    bs, B = spec.block_size, args.batch
    total_blocks = B * spec.num_blocks(context + args.steps)
    budget = args.budget if args.budget < 1 else int(args.budget)  # a fraction, or tokens
    budget_tokens = resolve_budget(budget, context)
    stats = {m: ModeStats() for m in modes}
    select_cfg = {  # exact: a shortlist of every candidate, re-ranked with exact keys
        mode: SelectionConfig(num_sinks=args.sinks, recent_window=args.window, refine=refine)
        for mode, refine in (("pq", args.refine), ("pq-codes", 1.0), ("exact", float(context)))
    }
    data = [_workload(spec, context, args.steps, args.seed + b, device) for b in range(B)]
    queries = torch.stack([w.queries for w in data], 2)  # [L, S, B, Hq, D]
    scale = data[0].cfg.softmax_scale
    full_out: dict[tuple[int, int, int], torch.Tensor] = {}
    results = []
    for mode in ["full"] + [m for m in modes if m != "full"]:
        st = stats.get(mode, ModeStats())
        clock = _Clock(device)
        truth: dict[int, torch.Tensor] = {}
        store = _store_for(mode, spec, total_blocks, device, truth)
        chunk = min(args.chunk, store.device_pool.num_slots * bs // 2)  # a chunk must fit the device tier
        seqs = []
        for w in data:
            seqs.append(_prefill(store, w.keys, w.values, context, chunk))
            truth[seqs[-1]] = torch.stack([w.keys, w.values], 1).transpose(2, 3)  # [L, 2, T, Hkv, D]
        if mode in SELECTING:  # training is prefill work, reported by `kvstore bench pq`
            indexes = [[_index_for(mode, spec, w.keys[layer, :, :context], args) for w in data] for layer in range(spec.num_layers)]
            # Every block starts on the host tier: a selection fetches the blocks it reads.
            ids = np.concatenate([store.block_table(seq).numpy() for seq in seqs])
            store.offload(torch.from_numpy(ids[store.blocks.dev_slot[ids] >= 0]))
        for s in range(args.steps):
            pos = context + s
            t0 = time.perf_counter()
            with clock("append"):
                for seq, w in zip(seqs, data):
                    _append_token(store, seq, w.keys, w.values, pos)
            for layer in range(spec.num_layers):
                q = queries[layer, s]  # [B, Hq, D]
                if mode in ("full", "lossless"):
                    outs = [_attend_all(store, seq, layer, q[b : b + 1], pos + 1, clock) for b, seq in enumerate(seqs)]
                else:
                    with clock("select"):
                        if mode != "pqcache-ref":
                            for index, w in zip(indexes[layer], data):
                                index.add(w.keys[layer, :, pos : pos + 1].float())
                            exact_keys = {
                                "pq": [partial(store.gather_keys, seq, layer) for seq in seqs],
                                "pq-codes": None,
                                "exact": [w.keys[layer, :, : pos + 1] for w in data],
                            }[mode]
                            chosen = select_tokens(
                                indexes[layer], q.float(), budget, block_size=bs, config=select_cfg[mode], keys=exact_keys,
                            )
                            positions = [sel.positions for sel in chosen]
                        else:  # PQCache selects for one sequence at a time
                            positions = []
                            for b, index in enumerate(indexes[layer]):
                                chosen = index.select(q[b].float().cpu(), budget_tokens).to(device)
                                # PQCache keeps generated tokens on the GPU beside its window.
                                gen = torch.arange(context, pos + 1, device=device).expand(chosen.shape[0], -1)
                                positions.append(torch.cat([chosen, gen], 1))
                    outs = [_attend_selected(store, seq, layer, q[b : b + 1], positions[b], clock) for b, seq in enumerate(seqs)]
                    t_metrics = time.perf_counter()  # quality is measured outside the step's time
                    for b, w in enumerate(data):
                        k_l = w.keys[layer, :, : pos + 1]
                        st.recall.append(metrics.recall_at_k(positions[b], q[b].float(), k_l, budget_tokens))
                        st.mass.append(metrics.attention_mass(positions[b], q[b].float(), k_l, scale))
                        asked = w.needles[w.needle_steps == s]
                        if asked.numel():
                            st.needles.append(metrics.needle_hits(positions[b], asked))
                    t0 += time.perf_counter() - t_metrics
                for b, out in enumerate(outs):
                    if mode == "full":
                        full_out[(b, s, layer)] = out
                    else:
                        st.rel_error.append(_rel_error(out, full_out[(b, s, layer)]))
            st.step_ms.append((time.perf_counter() - t0) * 1e3)
        st.select_ms = clock.totals["select"]
        st.fetch_ms = clock.totals["fetch"]
        st.attn_ms = clock.totals["attn"]
        mem = store.memory()
        st.device_bytes = mem["device"].bytes_used
        st.host_bytes = mem["host"].bytes_used
        if mode in ("pq", "pq-codes"):
            st.device_bytes += sum(int(ix.codes.numel()) for row in indexes for ix in row)  # uint8 codes
        if mode == "pq" and args.refine > 1:
            st.device_bytes += sum(8 * int((ix.outliers >= 0).sum()) for row in indexes for ix in row)  # outlier positions
        del store
    for mode in modes:
        st = stats[mode]
        sel = mode in SELECTING
        results.append({
            "mode": mode,
            "context": context,
            "budget": (budget_tokens / context) if sel else None,
            "tpot_ms": float(np.median(st.step_ms)),
            "tpot_p99_ms": float(np.percentile(st.step_ms, 99)),
            "select_ms": st.select_ms / args.steps,
            "fetch_ms": st.fetch_ms / args.steps,
            "attn_ms": st.attn_ms / args.steps,
            "recall": float(np.mean(st.recall)) if sel else None,
            "attention_mass": float(np.mean(st.mass)) if sel else None,
            "rel_error": float(np.mean(st.rel_error)) if st.rel_error else 0.0,
            "needle_hit_rate": float(np.mean(st.needles)) if sel and st.needles else None,
            "device_bytes": int(st.device_bytes),
            "host_bytes": int(st.host_bytes),
        })
    return results


def _plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_r, ax_q) = plt.subplots(1, 3, figsize=(16, 4))
    for mode in dict.fromkeys(r["mode"] for r in results):
        rows = sorted((r for r in results if r["mode"] == mode), key=lambda r: r["context"])
        ctx = [r["context"] for r in rows]
        ax_t.plot(ctx, [r["tpot_ms"] for r in rows], marker="o", label=mode)
        ax_q.plot(ctx, [r["rel_error"] for r in rows], marker="o", label=mode)
        if rows[0]["recall"] is not None:
            ax_r.plot(ctx, [r["recall"] for r in rows], marker="o", label=mode)
        else:
            ax_r.plot([], [])  # keep each mode's colour the same in every panel
    panels = ((ax_t, "time per output token (ms)"), (ax_r, "recall@k (selecting modes)"), (ax_q, "output relative error vs full"))
    for ax, label in panels:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax_r.set_ylim(0, 1)
    ax_q.set_yscale("symlog", linthresh=1e-6)
    ax_q.set_ylim(bottom=0)  # errors are >= 0; full is exactly 0
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args) -> int:
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    preset = args.preset or ("llama3-8b" if on_gpu else "tiny")
    layers = args.layers or (KVSpec.preset(preset).num_layers if preset == "tiny" else 2)
    spec = KVSpec.preset(preset, num_layers=layers)
    text = args.contexts or ("32768,131072" if on_gpu else "8192,32768")
    try:
        contexts = [int(c) for c in text.split(",")]
    except ValueError:
        raise SystemExit(f"--contexts: expected comma-separated token counts, got {text!r}") from None
    for name, value in (("--contexts", min(contexts)), ("--steps", args.steps), ("--batch", args.batch), ("--chunk", args.chunk)):
        if value < 1:
            raise SystemExit(f"{name} must be >= 1, got {value}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown mode(s) {unknown}; choose from {MODES}")
    if not modes:
        raise SystemExit("--modes: no mode given")
    torch.manual_seed(args.seed)
    results: list[dict] = []
    for context in tqdm(contexts, desc="long-context", unit="ctx"):
        results.extend(run_context(spec, context, args, device, modes))
    print_table(
        f"kvstore bench long-context — {preset} ({spec.num_layers} layers, {spec.num_q_heads}q/{spec.num_kv_heads}kv heads, "
        f"D={spec.head_dim}), {args.steps} decode steps x batch {args.batch}, {device}",
        ["mode", "context", "budget", "tpot ms", "p99 ms", "select", "fetch", "attn", "recall", "mass", "rel_error",
         "needles", "device MiB", "host MiB"],
        [
            (r["mode"], r["context"], r["budget"], r["tpot_ms"], r["tpot_p99_ms"], r["select_ms"], r["fetch_ms"],
             r["attn_ms"], r["recall"], r["attention_mass"], r["rel_error"], r["needle_hit_rate"],
             r["device_bytes"] / 2**20, r["host_bytes"] / 2**20)
            for r in results
        ],
    )
    write_json(args.json_out, {"machine": machine_info(device), "preset": preset, "results": results})
    if args.plot:
        _plot(results, args.plot)
    return 0
