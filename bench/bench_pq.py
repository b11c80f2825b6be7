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

import math
import time
from pathlib import Path

import torch

from kvstore.pq import metrics
from kvstore.pq.index import PQIndex
from kvstore.pq.select import SelectionConfig, resolve_budget, select_tokens
from kvstore.pq.synthetic import SyntheticConfig, SyntheticWorkload

from .baselines.pqcache_ref import PQCacheRef
from .common import add_common_args, machine_info, print_table, resolve_device, time_fn, write_json


def add_cli_args(parser) -> None:
    parser.add_argument("--tokens", type=int, default=32768, help="prompt tokens indexed")
    parser.add_argument("--kv-heads", type=int, default=8, help="KV heads")
    parser.add_argument("--group", type=int, default=4, help="query heads per KV head")
    parser.add_argument("--head-dim", type=int, default=128, help="head dimension")
    parser.add_argument("--budget", type=float, default=1 / 16, help="selected fraction of tokens (sinks and window included)")
    parser.add_argument("--decode-steps", type=int, default=16, help="decode queries scored")
    parser.add_argument("--sinks", type=int, default=SelectionConfig.num_sinks, help="sink tokens kept (kvstore)")
    parser.add_argument("--window", type=int, default=SelectionConfig.recent_window, help="recent tokens kept (kvstore)")
    parser.add_argument("--refine", default="2,4", help="comma-separated shortlist factors of the exact re-ranking rows ('' for none)")
    parser.add_argument("--repeat", type=int, default=20, help="timed repetitions of a search")
    parser.add_argument("--no-faiss", action="store_true", help="skip the faiss-cpu rows")
    parser.add_argument("--markdown", default=None, metavar="OUT", help="also write the results as markdown to OUT")
    add_common_args(parser)


def _quality(select, data: "object", budget: int, scale: float) -> dict:
    """Average selection quality over the decode steps; ``select(step) -> positions [Hkv, S]``."""
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
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    cfg = SyntheticConfig(
        num_kv_heads=args.kv_heads, group_size=args.group, head_dim=args.head_dim,
        prompt_len=args.tokens, num_decode=args.decode_steps, num_needles=min(8, args.decode_steps), seed=args.seed,
    )
    data = SyntheticWorkload(cfg).layer(0)
    P, H, D = args.tokens, args.kv_heads, args.head_dim
    keys = data.keys[:, :P].to(device)
    budget = resolve_budget(args.budget, P)
    scale = 1.0 / math.sqrt(D)
    queries = data.queries.to(device)

    config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}
    results: dict = {"config": {**config, "budget_tokens": budget}, "machine": machine_info(device), "methods": {}}
    quality_rows, speed_rows = [], []

    def kvstore_method(name: str, M: int, bits: int, refine: float = 1.0) -> None:
        sel_cfg = SelectionConfig(num_sinks=args.sinks, recent_window=args.window, refine=refine)
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

    kvstore_method("kvstore m4b8", 4, 8)
    kvstore_method("kvstore m2b6", 2, 6)
    for r in [float(x) for x in args.refine.split(",") if x.strip()]:
        kvstore_method(f"kvstore m4b8 refine {r:g}", 4, 8, refine=r)

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

    qual = _quality(exact_select, data, budget, scale)
    results["methods"]["exact"] = qual
    quality_rows.append(["exact", qual["recall"], qual["recall@64"], qual["mass"], qual["worst_mass"], qual["output_error"], qual["needle_hits"], 2 * D])

    if not args.no_faiss:
        import faiss  # lazy: only this row needs it

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
    def table(cols, rows) -> str:
        fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
        return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows])

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
