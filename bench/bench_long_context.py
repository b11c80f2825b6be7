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
from typing import NamedTuple

from kvstore.errors import ConfigError

from .common import (
    PRESET_NAMES, selection_defaults, Progress, add_common_args, comma_list, fraction_or_count, machine_info, names, nonnegative_int, plot_file, positive_float,
    positive_int, print_table, resolve_device, save_figure, write_json,
)

MODES = ("full", "pq", "pq-codes", "exact", "pqcache-ref", "lossless")
SELECTING = ("pq", "pq-codes", "exact", "pqcache-ref")
#: Row cache of the selecting modes: twice the default budget (1/16), so that a step's final rows
#: and most of the re-ranking shortlist of the step before stay (a choice of size, not a fit).
ROW_CACHE = 1 / 8
#: pq's re-ranking shortlist: a quarter more than the top-k. The shortlist's keys are read from the
#: host tier (refine/2 of the selected K/V bytes) and hold the picks' keys, which the row cache then
#: serves to the final fetch; refine 4 buys ~0.03 recall for ~2x the traffic (bench/RESULTS.md).
REFINE = 1.25


def _refine(text: str) -> float:
    """A shortlist factor: a finite number >= 1."""
    value = positive_float(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 1, got {text!r}")
    return value


def _row_cache(text: str) -> int | float:
    """0 (no cache), a fraction of the context in (0, 1] or a slot count >= 1."""
    return 0 if str(text).strip() == "0" else fraction_or_count(text)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    add_common_args(parser)
    parser.add_argument("--preset", default=None, choices=PRESET_NAMES, help="KVSpec preset (default: tiny on CPU, llama3-8b on CUDA)")
    parser.add_argument("--layers", type=positive_int, default=None, help="layers of the model (default: the preset's; more than the preset has, e.g. 32 on tiny, scale it up)")
    parser.add_argument("--contexts", type=comma_list(positive_int), default=None,
                        help="comma-separated prompt lengths (default: 8192,32768 on CPU; 32768,131072 on CUDA)")
    parser.add_argument("--steps", type=positive_int, default=16, help="decode steps per context (>= 2: the last one counts syncs, untimed)")
    parser.add_argument("--batch", type=positive_int, default=1, help="sequences decoded together, one token each per step (each its own workload seed)")
    parser.add_argument("--chunk", type=positive_int, default=4096, help="prefill chunk size in tokens")
    parser.add_argument("--budget", type=fraction_or_count, default=1 / 16, help="PQ token budget: a fraction of the context (0.0625, 1/16) or a token count (512)")
    parser.add_argument("--modes", type=names(MODES), default=list(MODES), help=f"comma-separated modes out of {', '.join(MODES)}")
    parser.add_argument("--subspaces", type=positive_int, default=4, help="PQ sub-vectors per head (kvstore)")
    parser.add_argument("--bits", type=positive_int, default=8, help="PQ bits per code (kvstore)")
    parser.add_argument("--sinks", type=nonnegative_int, default=None, help="sink tokens always kept (pq, pq-codes, exact) (default: SelectionConfig.num_sinks)")
    parser.add_argument("--window", type=nonnegative_int, default=None, help="recent tokens always kept (pq, pq-codes, exact) (default: SelectionConfig.recent_window)")
    parser.add_argument(
        "--refine", type=_refine, default=REFINE,
        help="shortlist factor of pq's exact re-ranking (1: codes only, as pq-codes; 4 reaches the oracle's recall and moves ~2x more)",
    )
    parser.add_argument(
        "--row-cache", type=_row_cache, default=ROW_CACHE, metavar="F",
        help="slots per KV head and layer of the selecting modes' device cache of host rows: a fraction of the context or a count (0: none)",
    )
    parser.add_argument("--plot", type=plot_file, default=None, metavar="OUT.png", help="plot TPOT and quality against context (checked writable before the run)")


# ---------------------------------------------------------------------------------------------
@dataclass
class ModeStats:
    """What one mode measured over one context."""

    step_ms: list[float] = field(default_factory=list)
    recall: list[float] = field(default_factory=list)
    mass: list[float] = field(default_factory=list)
    rel_error: list[float] = field(default_factory=list)
    needles: list[float] = field(default_factory=list)


class _Clock:
    """Accumulates wall time of named phases (synchronising CUDA around each)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = {"select": 0.0, "fetch": 0.0, "attn": 0.0, "append": 0.0}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        import torch

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
    import torch
    from kvstore.pq.synthetic import SyntheticConfig, SyntheticWorkload

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


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def _store_for(mode: str, spec: KVSpec, blocks: int, device: torch.device, truth: dict[int, torch.Tensor], args, row_cache: int) -> KVStore:
    """The tiers of one mode for sequences of ``blocks`` blocks in all; ``truth`` (filled by the
    caller: sequence id -> ``[L, 2, T, Hkv, D]``) is what lossless recomputes from. Checks are
    deferred to the end of each step on every device, as on a GPU. The selecting modes read
    through a device row cache of ``row_cache`` slots per KV head and layer."""
    from kvstore.pq import PQConfig
    from kvstore.pq.select import SelectionConfig
    from kvstore.store import KVStore

    if mode == "full":
        return KVStore(spec, device_blocks=blocks, device=device, defer_checks=True)
    if mode == "lossless":
        return KVStore(
            spec, device_blocks=max(2, blocks // 4), host_blocks=max(1, blocks // 2), device=device, defer_checks=True,
            recompute=lambda s, start, n: truth[s][:, :, start : start + n],
        )
    pq = None
    if mode in ("pq", "pq-codes"):
        refine = args.refine if mode == "pq" else 1.0
        selection = SelectionConfig(num_sinks=args.sinks, recent_window=args.window, refine=refine)
        pq = PQConfig(num_subspaces=args.subspaces, bits=args.bits, selection=selection)
    return KVStore(spec, device_blocks=max(2, blocks // 2), host_blocks=blocks, device=device, defer_checks=True, pq=pq, row_cache=row_cache)


def _baseline_index(mode: str, spec: KVSpec, keys: torch.Tensor):
    """The selector of a baseline mode over ``keys: [Hkv, N, D]``: PQCache's, trained (None for exact)."""
    from .baselines.pqcache_ref import PQCacheRef

    if mode != "pqcache-ref":
        return None
    index = PQCacheRef(spec.head_dim)
    index.train(keys.float().cpu())
    return index


def _select(mode: str, store: KVStore, seqs: list[int], data: list, indexes, layer: int, q: torch.Tensor, pos: int, budget, args, context: int) -> list[torch.Tensor]:
    """Per-head positions ``[Hkv, S]`` each sequence of the batch reads in ``layer`` (``q: [B, Hq, D]``)."""
    import torch
    from kvstore.pq.select import SelectionConfig, resolve_budget, select_exact

    if mode in ("pq", "pq-codes"):  # kvstore: the batch scored in one call
        return [sel.positions for sel in store.select_many(seqs, layer, q, [budget] * len(seqs))]
    if mode == "exact":  # the oracle: every key scored exactly
        cfg = SelectionConfig(num_sinks=args.sinks, recent_window=args.window)
        return [
            select_exact(w.keys[layer, :, : pos + 1], q[b].float(), budget, config=cfg, block_size=store.spec.block_size).positions
            for b, w in enumerate(data)
        ]
    positions = []  # PQCache selects for one sequence at a time
    for b, index in enumerate(indexes[layer]):
        chosen = index.select(q[b].float().cpu(), resolve_budget(budget, context)).to(store.device)
        # PQCache keeps generated tokens on the GPU beside its window.
        gen = torch.arange(context, pos + 1, device=store.device).expand(chosen.shape[0], -1)
        positions.append(torch.cat([chosen, gen], 1))
    return positions


def run_context(spec: KVSpec, context: int, args, device: torch.device, modes: list[str], progress: Progress) -> list[dict]:
    """Every mode over one context; a batch of ``args.batch`` sequences (each its own workload
    seed) shares the store's tiers and is decoded together: each step appends one token to every
    sequence, and kvstore's selection scores the whole batch in one call per layer. The last step
    runs under a SyncCounter (untimed, no quality figures) to count the syncs per layer and step."""
    import numpy as np
    import torch
    from kvstore.attn import multi_segment_attention
    from kvstore.pq import metrics
    from kvstore.pq.select import resolve_budget
    from kvstore.syncs import SyncCounter

    bs, B = spec.block_size, args.batch
    total_blocks = B * spec.num_blocks(context + args.steps)
    budget = args.budget  # a fraction, or tokens
    budget_tokens = resolve_budget(budget, context)
    row_cache = resolve_budget(args.row_cache, context) if args.row_cache else 0
    kv_row = 2 * spec.head_dim * spec.dtype.itemsize  # K and V bytes of one token, head and layer
    data = [_workload(spec, context, args.steps, args.seed + b, device) for b in range(B)]
    queries = torch.stack([w.queries for w in data], 2)  # [L, S, B, Hq, D]
    scale = data[0].cfg.softmax_scale
    full_out: dict[tuple[int, int, int], torch.Tensor] = {}
    results = []
    for mode in ["full"] + [m for m in modes if m != "full"]:
        progress.step(f"{mode} at {context} tokens: prefill, {args.steps} decode steps")
        st = ModeStats()
        clock = _Clock(device)
        truth: dict[int, torch.Tensor] = {}
        store = _store_for(mode, spec, total_blocks, device, truth, args, row_cache)
        chunk = min(args.chunk, store.device_pool.num_slots * bs // 2)  # a chunk must fit the device tier
        seqs = []
        for w in data:  # prefill (PQ training included: `kvstore bench pq` times it)
            seqs.append(_prefill(store, w.keys, w.values, context, chunk))
            truth[seqs[-1]] = torch.stack([w.keys, w.values], 1).transpose(2, 3)  # [L, 2, T, Hkv, D]
        indexes = [[_baseline_index(mode, spec, w.keys[layer, :, :context]) for w in data] for layer in range(spec.num_layers)]
        if mode in SELECTING:  # every block starts on the host tier: a step reads what it selects from there
            ids = np.concatenate([store.block_table(seq).numpy() for seq in seqs])
            store.offload(torch.from_numpy(ids[store.blocks.dev_slot[ids] >= 0]))
        store.end_step()
        moved0, selected, counter = _h2d_bytes(store), 0, None
        for s in range(args.steps):
            pos = context + s
            counted = s == args.steps - 1
            if counted:  # its time and quality are not reported
                timed_totals = dict(clock.totals)
                counter = SyncCounter(device)
                counter.tag_tree(store, exclude=[store.host_pool.kv])
                counter.tag(queries, *[t for w in data for t in (w.keys, w.values)])
                counter.__enter__()
            t0 = time.perf_counter()
            with clock("append"):
                for seq, w in zip(seqs, data):
                    _append_token(store, seq, w.keys, w.values, pos)
            for layer in range(spec.num_layers):
                q = queries[layer, s]  # [B, Hq, D]
                if mode in ("full", "lossless"):
                    with clock("attn"):  # every token, missing blocks brought in (reloaded, recomputed)
                        outs = [store.attend(seq, layer, q[b : b + 1], scale=scale)[0] for b, seq in enumerate(seqs)]
                    selected += B * (pos + 1) * spec.num_kv_heads * kv_row
                else:
                    with clock("select"):
                        positions = _select(mode, store, seqs, data, indexes, layer, q, pos, budget, args, context)
                    outs = []
                    for b, seq in enumerate(seqs):
                        with clock("fetch"):  # this layer's selected rows, wherever they lie
                            k, v = store.fetch(seq, layer, positions[b])
                        with clock("attn"):
                            segment = (k.transpose(0, 1), v.transpose(0, 1))
                            outs.append(multi_segment_attention(q[b : b + 1], [segment], causal_last=False, scale=scale)[0])
                        selected += positions[b].numel() * kv_row
                    if not counted:  # quality is measured outside the step's time
                        t_metrics = time.perf_counter()
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
                    elif not counted:
                        st.rel_error.append(_rel_error(out, full_out[(b, s, layer)]))
            store.end_step()
            if counted:
                counter.__exit__(None, None, None)
                clock.totals = timed_totals
            else:
                st.step_ms.append((time.perf_counter() - t0) * 1e3)
        mem = store.memory()
        sel = mode in SELECTING
        results.append({
            "mode": mode,
            "context": context,
            "layers": spec.num_layers,
            "budget": (budget_tokens / context) if sel else None,
            "tpot_ms": float(np.median(st.step_ms)),
            "tpot_p99_ms": float(np.percentile(st.step_ms, 99)),
            "select_ms": clock.totals["select"] / len(st.step_ms),
            "fetch_ms": clock.totals["fetch"] / len(st.step_ms),
            "attn_ms": clock.totals["attn"] / len(st.step_ms),
            "recall": float(np.mean(st.recall)) if sel else None,
            "attention_mass": float(np.mean(st.mass)) if sel else None,
            "rel_error": float(np.mean(st.rel_error)) if st.rel_error else 0.0,
            "needle_hit_rate": float(np.mean(st.needles)) if sel and st.needles else None,
            "device_bytes": mem["device"].bytes_used + store.index_bytes() + store.row_cache_bytes(),
            "row_cache_rows": row_cache if sel else 0,
            "host_bytes": mem["host"].bytes_used,
            "fetch_bytes_per_token": (_h2d_bytes(store) - moved0) / (args.steps * B),
            "selected_bytes_per_token": selected / (args.steps * B),
            "syncs_per_layer_step": counter.count / spec.num_layers,
        })
        del store
    order = {m: i for i, m in enumerate(modes)}
    return sorted((r for r in results if r["mode"] in order), key=lambda r: order[r["mode"]])


def _h2d_bytes(store: KVStore) -> int:
    """Host-to-device bytes the store's mover moved so far: whole blocks and fetched rows."""
    return store.mover.stats.h2d_bytes + int(store.mover.row_bytes)


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
    save_figure(fig, path)


def main(args) -> int:
    import torch
    from kvstore.spec import KVSpec

    selection_defaults(args)
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    preset = args.preset or ("llama3-8b" if on_gpu else "tiny")
    contexts = args.contexts or ([32768, 131072] if on_gpu else [8192, 32768])
    spec = KVSpec.preset(preset, num_layers=args.layers or KVSpec.preset(preset).num_layers)
    if args.steps < 2:
        raise ConfigError(f"--steps must be >= 2, got {args.steps} (the last step counts syncs and is not timed)")
    modes = args.modes
    torch.manual_seed(args.seed)
    results: list[dict] = []
    with Progress("bench long-context", total=len(contexts) * len(set(modes) | {"full"})) as progress:
        for context in contexts:
            results.extend(run_context(spec, context, args, device, modes, progress))
    print_table(
        f"kvstore bench long-context — {preset} ({spec.num_layers} layers, {spec.num_q_heads}q/{spec.num_kv_heads}kv heads, "
        f"D={spec.head_dim}), {args.steps} decode steps x batch {args.batch}, {device}",
        ["mode", "context", "budget", "tpot ms", "p99 ms", "select", "fetch", "attn", "recall", "mass", "rel_error",
         "needles", "device MiB", "host MiB", "h2d / selected", "syncs / layer"],
        [
            (r["mode"], r["context"], r["budget"], r["tpot_ms"], r["tpot_p99_ms"], r["select_ms"], r["fetch_ms"],
             r["attn_ms"], r["recall"], r["attention_mass"], r["rel_error"], r["needle_hit_rate"],
             r["device_bytes"] / 2**20, r["host_bytes"] / 2**20,
             r["fetch_bytes_per_token"] / r["selected_bytes_per_token"], r["syncs_per_layer_step"])
            for r in results
        ],
    )
    write_json(args.json_out, {"machine": machine_info(device), "preset": preset, "results": results})
    if args.plot:
        _plot(results, args.plot)
    return 0
