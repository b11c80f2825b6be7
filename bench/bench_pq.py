"""PQ token selection: quality, code memory and CPU speed vs PQCache's reference and faiss-cpu.

On the synthetic long-context workload (kvstore.pq.synthetic) one layer of ``--tokens``
prompt tokens is indexed and each of ``--decode-steps`` decode queries selects ``--budget``
of the tokens (sinks and window included). Methods, all at the same token budget:

* ``kvstore m4b8``: PQIndex M=4, 8 bits (4 B codes per token per head), GQA "sum";
* ``kvstore m2b6``: the same code bits as PQCache (m=2, b=6);
* ``kvstore m4b8 refine R``: M=4, 8 bits, then exact re-ranking of a shortlist of R x the
  top-k plus the index's outliers (reads those keys: R x the K bytes of the selection);
* ``pqcache_ref``: PQCache's published selection (bench/baselines/pqcache_ref.py);
* ``exact``: the same sinks + window + top-k with exact scores (the ceiling of any scorer).

Speed: training a layer (k-means + encoding every token) and searching one query over all
tokens and heads, next to faiss-cpu (ProductQuantizer train + compute_codes; IndexPQ inner
product search, one index per head) and pqcache_ref.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from kvstore.errors import ConfigError

from .common import (
    selection_defaults, Progress, add_common_args, comma_list, fraction_or_count, machine_info, markdown_table, nonnegative_int, output_file,
    positive_int, print_table, resolve_device, time_fn, write_json,
)

#: PQ shapes of the kvstore rows (sub-vectors M, bits); head_dim must split into each M
KVSTORE_PQ = {"kvstore m4b8": (4, 8), "kvstore m2b6": (2, 6)}
#: PQCache's own sub-vectors (m=2): its sub-vector split needs an even head_dim too
PQCACHE_SUBVEC = 2


def refine_factor(text: str) -> float:
    """A re-ranking shortlist factor: a finite number > 1 (1 would repeat the codes-only row)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shortlist factor > 1, got {text!r}") from None
    if not (math.isfinite(value) and value > 1):
        raise argparse.ArgumentTypeError(f"expected a shortlist factor > 1, got {text!r}")
    return value


def add_cli_args(parser) -> None:
    parser.add_argument("--tokens", type=positive_int, default=32768, help="prompt tokens indexed")
    parser.add_argument("--kv-heads", type=positive_int, default=8, help="KV heads")
    parser.add_argument("--group", type=positive_int, default=4, help="query heads per KV head")
    parser.add_argument("--head-dim", type=positive_int, default=128, help="head dimension (a multiple of 4)")
    parser.add_argument("--budget", type=fraction_or_count, default=1 / 16,
                        help="selected tokens (sinks and window included): a fraction of the tokens, or a count")
    parser.add_argument("--decode-steps", type=positive_int, default=16, help="decode queries scored")
    parser.add_argument("--sinks", type=nonnegative_int, default=None, help="sink tokens kept (kvstore) (default: SelectionConfig.num_sinks)")
    parser.add_argument("--window", type=nonnegative_int, default=None, help="recent tokens kept (kvstore) (default: SelectionConfig.recent_window)")
    parser.add_argument("--refine", type=comma_list(refine_factor, allow_empty=True), default="2,4",
                        help="comma-separated shortlist factors (> 1) of the exact re-ranking rows ('' for none)")
    parser.add_argument("--repeat", type=positive_int, default=20, help="timed repetitions of a search")
    parser.add_argument("--no-faiss", action="store_true", help="skip the faiss-cpu rows")
    parser.add_argument("--markdown", type=output_file, default=None, metavar="OUT",
                        help="also write the results as markdown to OUT (checked writable before the run)")
    add_common_args(parser)


def _check(args, budget: int) -> None:
    """Option combinations the run cannot use, before any work (ConfigError naming the values)."""
    from .baselines.pqcache_ref import PQCacheRef

    bits = max(b for _, b in KVSTORE_PQ.values())
    for name, (M, _) in KVSTORE_PQ.items():
        if args.head_dim % M:
            raise ConfigError(f"--head-dim {args.head_dim} must be a multiple of {M} ({name})")
    if args.tokens < 2**bits:
        raise ConfigError(f"--tokens {args.tokens} must be >= {2**bits} (one k-means point per centroid of {bits}-bit codes)")
    ref_sinks = PQCacheRef(args.head_dim).sink_size
    if args.tokens <= ref_sinks + 2**bits:
        raise ConfigError(f"--tokens {args.tokens} must be > {ref_sinks + 2**bits} (pqcache_ref's {ref_sinks} sinks + {2**bits} centroids)")
    if budget < ref_sinks:
        raise ConfigError(f"--budget {args.budget} buys {budget} tokens; pqcache_ref keeps {ref_sinks} sink tokens, so it needs >= {ref_sinks}")
    if args.sinks + args.window > budget:
        raise ConfigError(f"--sinks {args.sinks} + --window {args.window} exceed the budget of {budget} tokens")


def _quality(select, data: "object", budget: int, scale: float) -> dict:
    """Average selection quality over the decode steps; ``select(step) -> positions [Hkv, S]``."""
    from kvstore.pq import metrics

    P = data.keys.shape[1] - data.queries.shape[0]
    keys, values = data.keys[:, :P], data.values[:, :P]
    rows = {"recall": [], "recall@64": [], "mass": [], "output_error": []}
    needle = []
    for s in range(data.queries.shape[0]):
        q = data.queries[s]
        pos = select(s)
        rows["recall"].append(metrics.recall_at_k(pos, q, keys, budget))
        rows["recall@64"].append(metrics.recall_at_k(pos, q, keys, 64))
        rows["mass"].append(metrics.attention_mass(pos, q, keys, scale))
        rows["output_error"].append(metrics.output_error(pos, q, keys, values, scale))
        asked = (data.needle_steps == s).nonzero().flatten()
        if len(asked):
            needle.append(metrics.needle_hits(pos, data.needle_positions[asked]))
    out = {name: sum(v) / len(v) for name, v in rows.items()}
    out["worst_mass"] = min(rows["mass"])
    out["needle_hits"] = sum(needle) / len(needle) if needle else None
    return out


def main(args) -> int:
    import torch
    from kvstore.pq.index import PQIndex
    from kvstore.pq.select import SelectionConfig, resolve_budget, select_tokens
    from kvstore.pq.synthetic import SyntheticConfig, SyntheticWorkload
    from .baselines.pqcache_ref import PQCacheRef

    selection_defaults(args)
    device = resolve_device(args.device)
    cfg = SyntheticConfig(
        num_kv_heads=args.kv_heads, group_size=args.group, head_dim=args.head_dim,
        prompt_len=args.tokens, num_decode=args.decode_steps, num_needles=min(8, args.decode_steps), seed=args.seed,
    )
    P, H, D = args.tokens, args.kv_heads, args.head_dim
    budget = resolve_budget(args.budget, P)
    _check(args, budget)
    sel_configs = {1.0: SelectionConfig(num_sinks=args.sinks, recent_window=args.window)}
    sel_configs |= {r: SelectionConfig(num_sinks=args.sinks, recent_window=args.window, refine=r) for r in args.refine}
    with Progress("bench pq", total=len(KVSTORE_PQ) + len(args.refine) + 3 + (not args.no_faiss)) as progress:
        progress.step("synthetic workload")
        torch.manual_seed(args.seed)
        data = SyntheticWorkload(cfg).layer(0)
        keys = data.keys[:, :P].to(device)
        scale = 1.0 / math.sqrt(D)
        queries = data.queries.to(device)

        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}
        results: dict = {"config": {**config, "budget_tokens": budget}, "machine": machine_info(device), "methods": {}}
        quality_rows, speed_rows = [], []

        def kvstore_method(name: str, M: int, bits: int, refine: float = 1.0) -> None:
            progress.step(f"{name}: train, time search and select, score {args.decode_steps} queries")
            sel_cfg = sel_configs[refine]
            keys_arg = [keys] if refine > 1 else None
            index = PQIndex(D, M, bits)
            t0 = time.perf_counter()
            index.train(keys)
            index.add(keys)
            train_s = time.perf_counter() - t0
            q1 = queries[0].view(H, args.group, D)[:, :1]  # one query per KV head
            search = time_fn(lambda: index.search(q1, budget), warmup=3, repeat=args.repeat, device=device)
            select = time_fn(lambda: select_tokens([index], [queries[0]], budget, config=sel_cfg, keys=keys_arg), warmup=3, repeat=args.repeat, device=device)
            qual = _quality(lambda s: select_tokens([index], [queries[s]], budget, config=sel_cfg, keys=keys_arg)[0].positions.cpu(), data, budget, scale)
            results["methods"][name] = {**qual, "train_s": train_s, "search_ms": search.median_ms, "select_ms": select.median_ms, "code_bytes_per_token_head": M}
            quality_rows.append([name, qual["recall"], qual["recall@64"], qual["mass"], qual["worst_mass"], qual["output_error"], qual["needle_hits"], M])
            speed_rows.append([name, train_s, search.median_ms, select.median_ms])

        for name, (M, bits) in KVSTORE_PQ.items():
            kvstore_method(name, M, bits)
        for r in args.refine:
            kvstore_method(f"kvstore m4b8 refine {r:g}", *KVSTORE_PQ["kvstore m4b8"], refine=r)

        progress.step("pqcache_ref: train, time select, score")
        ref = PQCacheRef(D, sink_size=32, seed=args.seed)
        t0 = time.perf_counter()
        ref.train(data.keys[:, :P])
        ref_train = time.perf_counter() - t0
        ref_select = time_fn(lambda: ref.select(data.queries[0], budget), warmup=1, repeat=max(3, args.repeat // 4))
        qual = _quality(lambda s: ref.select(data.queries[s], budget), data, budget, scale)
        results["methods"]["pqcache_ref"] = {**qual, "train_s": ref_train, "select_ms": ref_select.median_ms, "code_bytes_per_token_head": ref.code_bytes_per_token}
        quality_rows.append(["pqcache_ref", qual["recall"], qual["recall@64"], qual["mass"], qual["worst_mass"], qual["output_error"], qual["needle_hits"], ref.code_bytes_per_token])
        speed_rows.append(["pqcache_ref", ref_train, None, ref_select.median_ms])

        def exact_select(s: int) -> torch.Tensor:
            q = data.queries[s].view(H, args.group, D)
            probs = torch.softmax(torch.matmul(q, data.keys[:, :P].transpose(1, 2)) * scale, -1).sum(1)  # [H, P]
            probs[:, : args.sinks] = float("inf")
            probs[:, P - args.window :] = float("inf")
            return probs.topk(budget, -1).indices.sort(-1).values

        progress.step("exact top-k: score")
        qual = _quality(exact_select, data, budget, scale)
        results["methods"]["exact"] = qual
        quality_rows.append(["exact", qual["recall"], qual["recall@64"], qual["mass"], qual["worst_mass"], qual["output_error"], qual["needle_hits"], 2 * D])

        if not args.no_faiss:
            import faiss  # lazy: only this row needs it

            progress.step("faiss IndexPQ m4b8: train, time search")

            x = data.keys[:, :P].float().numpy()
            t0 = time.perf_counter()
            indexes = []
            for h in range(H):
                idx = faiss.IndexPQ(D, 4, 8, faiss.METRIC_INNER_PRODUCT)
                idx.pq.cp.niter = 6
                idx.pq.cp.min_points_per_centroid = 1  # the torch path samples 32 per centroid too
                idx.train(x[h])
                idx.add(x[h])
                indexes.append(idx)
            faiss_train = time.perf_counter() - t0
            q1 = data.queries[0].view(H, args.group, D)[:, 0].float().numpy()
            faiss_search = time_fn(lambda: [indexes[h].search(q1[h : h + 1], budget) for h in range(H)], warmup=2, repeat=args.repeat)
            results["methods"]["faiss IndexPQ m4b8"] = {"train_s": faiss_train, "search_ms": faiss_search.median_ms}
            speed_rows.append(["faiss IndexPQ m4b8", faiss_train, faiss_search.median_ms, None])

        results["code_memory"] = {
            "kvstore_bytes_per_token_head": 4, "fp16_key_bytes_per_token_head": 2 * D, "ratio": 4 / (2 * D),
            "pqcache_ref_bytes_per_token_head": ref.code_bytes_per_token,
        }
    qcols = ["name", "recall@budget", "recall@64", "mass", "worst mass", "output err", "needle hits", "code B/tok/head"]
    scols = ["name", "train layer (s)", "search 1 query (ms)", "select GQA (ms)"]
    print_table(f"PQ selection quality: {P} tokens, {H} KV heads x {args.group}, D={D}, budget {budget} tokens", qcols, quality_rows)
    print_table("PQ speed (CPU)" if device.type == "cpu" else f"PQ speed ({device})", scols, speed_rows)
    write_json(args.json_out, results)
    if args.markdown:
        _write_markdown(Path(args.markdown), results, qcols, quality_rows, scols, speed_rows)
    return 0


def _write_markdown(path: Path, results: dict, qcols, qrows, scols, srows) -> None:
    table = markdown_table
    c = results["config"]
    text = (
        f"## PQ token selection (`kvstore bench pq`)\n\n"
        f"{c['tokens']} prompt tokens, {c['kv_heads']} KV heads x {c['group']} query heads, head_dim {c['head_dim']}, "
        f"budget {c['budget_tokens']} tokens (sinks and window included), {c['decode_steps']} decode queries, seed {c['seed']}; "
        f"machine: {results['machine']['processor']}, {results['machine']['cpu_count']} CPUs, torch {results['machine']['torch']}.\n\n"
        f"### Quality\n\n{table(qcols, qrows)}\n\n### Speed\n\n{table(scols, srows)}\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
