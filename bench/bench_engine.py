"""Engine benchmark: a request trace replayed through a real vLLM engine, with and without kvstore.

Each engine runs in its own subprocess (vLLM keeps process-wide state) and is driven by a
script of steps (generate, reset_prefix_cache); the subprocess answers with JSON. The same
harness runs the engine tests (tests/integrations/engine/) and can start several engines side by
side (two engines sharing one remote tier, each its own :func:`run_engine`).

The model is a seeded random Llama checkpoint written locally (safetensors, config and a
word-level tokenizer whose word ``wN`` is token ``N``): no download, and unlike vLLM's
``load_format="dummy"`` (uniform +-1e-3 weights) its output depends on its context, so a wrong
KV block changes tokens and logprobs.

The benchmark replays requests of a Mooncake-format trace (``hash_ids``: one hash per block of
prompt; equal hash, equal tokens) one after another: by default a conversation-sampled miniature
of the whole trace (:func:`trace_prompts`), since its first minutes hold no follow-up turns; each prompt built from its blocks
(``--tokens-per-block`` tokens per trace block, a seeded random word per token keyed by the
hash, so requests sharing a hash prefix share a token prefix). Rows: vLLM alone (its GPU prefix
cache only), vLLM + KVStoreConnector (host tier beneath it) and, where it runs on this platform,
vLLM's own OffloadingConnector (CPU tier) with kvstore's ``asym`` as its CachePolicy; every row
has the same KV-cache size. It reports TTFT p50/p99, prompt tokens computed, tokens served from
vLLM's cache and from the connector, throughput and the host tier's bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: vLLM's CPU attention needs a block size that is a multiple of 32 (16 fails at engine start).
CPU_BLOCK_MULTIPLE = 32


# ====================================================================== the model
@dataclass(frozen=True, kw_only=True)
class TinyLlama:
    """Shape of a seeded random Llama checkpoint (see :func:`write_llama`).

    Weight scales are chosen so the model is sensitive to its context and its greedy choice is
    stable: inputs of every linear layer have unit RMS (after RMSNorm) and weights have std
    ``1/sqrt(fan_in)``, so activations and attention scores are O(1); the LM head has std
    ``logit_std/sqrt(hidden)``, so logits have std ``logit_std`` and the gap between the two
    best tokens is large next to float32 rounding.
    """

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    vocab: int = 512
    max_positions: int = 4096
    logit_std: float = 3.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"TinyLlama.{name} must be a positive int, got {value!r}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"TinyLlama: hidden={self.hidden} must split into heads={self.heads}, heads into kv_heads={self.kv_heads}")
        if self.vocab < 8:
            raise ValueError(f"TinyLlama.vocab must be >= 8 (3 special tokens + words), got {self.vocab}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def first_word(self) -> int:
        """Token ids below this are special (<s>, </s>, <unk>); prompts use the words above."""
        return 3


def write_llama(path: str | Path, shape: TinyLlama = TinyLlama()) -> Path:
    """Write a random Llama checkpoint (config.json, model.safetensors, tokenizer files) to ``path``."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    s = shape
    gen = torch.Generator().manual_seed(s.seed)

    def normal(*size: int, std: float) -> torch.Tensor:
        return torch.randn(*size, generator=gen) * std

    kv = s.kv_heads * s.head_dim
    tensors = {"model.embed_tokens.weight": normal(s.vocab, s.hidden, std=1.0)}
    for i in range(s.layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": normal(s.hidden, s.hidden, std=s.hidden**-0.5),
            p + "self_attn.k_proj.weight": normal(kv, s.hidden, std=s.hidden**-0.5),
            p + "self_attn.v_proj.weight": normal(kv, s.hidden, std=s.hidden**-0.5),
            p + "self_attn.o_proj.weight": normal(s.hidden, s.hidden, std=s.hidden**-0.5),
            p + "mlp.gate_proj.weight": normal(s.intermediate, s.hidden, std=s.hidden**-0.5),
            p + "mlp.up_proj.weight": normal(s.intermediate, s.hidden, std=s.hidden**-0.5),
            p + "mlp.down_proj.weight": normal(s.hidden, s.intermediate, std=s.intermediate**-0.5),
            p + "input_layernorm.weight": 1.0 + normal(s.hidden, std=0.1),
            p + "post_attention_layernorm.weight": 1.0 + normal(s.hidden, std=0.1),
        }
    tensors["model.norm.weight"] = 1.0 + normal(s.hidden, std=0.1)
    tensors["lm_head.weight"] = normal(s.vocab, s.hidden, std=s.logit_std * s.hidden**-0.5)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))

    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
        "hidden_size": s.hidden, "intermediate_size": s.intermediate, "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "head_dim": s.head_dim,
        "vocab_size": s.vocab, "max_position_embeddings": s.max_positions, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 0, "eos_token_id": 1,
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2} | {f"w{i}": i for i in range(s.first_word, s.vocab)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": s.max_positions,
    }))
    return path


def words(tokens: Sequence[int]) -> str:
    """The text whose tokens are ``tokens`` under :func:`write_llama`'s tokenizer."""
    return " ".join(f"w{t}" for t in tokens)


# ====================================================================== one engine, one subprocess
@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """One vLLM engine (``LLM``) as the subprocess builds it.

    Attributes:
        model: checkpoint folder (e.g. from :func:`write_llama`).
        block_size: vLLM's block size in tokens (a multiple of 32 on CPU).
        num_gpu_blocks: vLLM's KV-cache size in blocks (the same in every row of a comparison).
        kv_transfer_config: vLLM's ``kv_transfer_config`` dict; None runs vLLM alone.
        max_model_len, max_num_batched_tokens: vLLM's limits.
        enable_prefix_caching: vLLM's own GPU prefix cache.
        pythonpath: extra import roots of the subprocess (e.g. a test connector's folder).
        env: extra environment of the subprocess.
    """

    model: str
    block_size: int = 32
    num_gpu_blocks: int = 129
    kv_transfer_config: Mapping[str, Any] | None = None
    max_model_len: int = 2048
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    pythonpath: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size <= 0 or self.block_size % CPU_BLOCK_MULTIPLE:
            raise ValueError(f"EngineConfig.block_size must be a positive multiple of {CPU_BLOCK_MULTIPLE}, got {self.block_size!r}")
        if not isinstance(self.num_gpu_blocks, int) or self.num_gpu_blocks <= 0:
            raise ValueError(f"EngineConfig.num_gpu_blocks must be a positive int, got {self.num_gpu_blocks!r}")
        if self.max_model_len > (self.num_gpu_blocks - 1) * self.block_size:  # vLLM keeps one null block
            raise ValueError(f"EngineConfig.max_model_len={self.max_model_len} exceeds the KV cache "
                             f"({self.num_gpu_blocks} blocks of {self.block_size} tokens, one of them vLLM's null block): "
                             "vLLM refuses to start")


def kvstore_transfer_config(**extra: Any) -> dict[str, Any]:
    """``kv_transfer_config`` of KVStoreConnector with ``extra`` as its ``kv_connector_extra_config``."""
    return {
        "kv_connector": "KVStoreConnector", "kv_connector_module_path": "kvstore.integrations.vllm",
        "kv_role": "kv_both", "kv_connector_extra_config": dict(extra),
    }


def engine_env(extra: Mapping[str, str] = {}, pythonpath: Sequence[str] = ()) -> dict[str, str]:
    """Environment of an engine subprocess: this checkout's kvstore first on the path.

    ``VLLM_CPU_NUM_OF_RESERVED_CPU=1``: vLLM's CPU worker reserves one more core whenever a
    ``kv_transfer_config`` is set; on a 2-core machine that binds the worker to both and slows
    requests 2-3x. ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine core (and the worker)
    in the subprocess, so it needs no further process and a test connector sees the same process.
    """
    import kvstore

    root = str(Path(kvstore.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, *pythonpath, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra)
    return env


def run_engine(config: EngineConfig, steps: Sequence[Mapping[str, Any]], *, timeout: float = 600.0) -> list[dict[str, Any]]:
    """Run ``steps`` in one fresh engine subprocess; one result dict per step (see :func:`_worker`).

    Steps: ``{"op": "generate", "prompts": [[token ids]...], "max_tokens": n}`` (greedy,
    ``ignore_eos``; one call to ``LLM.generate``, so its prompts form one batch) and
    ``{"op": "reset"}`` (``LLM.reset_prefix_cache()``: vLLM's cache only, the connector keeps
    its tier). A failing subprocess raises RuntimeError with the tail of its output.
    """
    with tempfile.TemporaryDirectory(prefix="kvstore-engine-") as tmp:
        spec = Path(tmp) / "spec.json"
        out = Path(tmp) / "out.json"
        spec.write_text(json.dumps({"config": asdict(config), "steps": list(steps)}))
        proc = subprocess.run(
            [sys.executable, "-c", "from kvstore._locate import import_bench; import_bench('bench_engine')._worker()",
             str(spec), str(out)],
            env=engine_env(config.env, config.pythonpath), capture_output=True, text=True, timeout=timeout,
        )
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"engine subprocess failed (rc={proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
        return json.loads(out.read_text())


def _counters(llm: Any) -> dict[str, float]:
    """vLLM's prefix-cache counters: tokens from its own cache and from the connector."""
    names = {"vllm:prefix_cache_hits": "device_hits", "vllm:external_prefix_cache_hits": "connector_hits",
             "vllm:prompt_tokens": "prompt_tokens"}
    got = dict.fromkeys(names.values(), 0.0)
    for metric in llm.get_metrics():
        if metric.name in names:
            got[names[metric.name]] += float(getattr(metric, "value", 0.0))
    return got


def _worker() -> None:
    """Subprocess entry: build the engine of ``argv[1]``, run its steps, write JSON to ``argv[2]``."""
    spec = json.loads(Path(sys.argv[1]).read_text())
    cfg = spec["config"]
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kv = cfg["kv_transfer_config"]
    llm = LLM(
        model=cfg["model"], tokenizer=cfg["model"], dtype="float32", seed=0, enforce_eager=True,
        block_size=cfg["block_size"], num_gpu_blocks_override=cfg["num_gpu_blocks"],
        max_model_len=cfg["max_model_len"], max_num_batched_tokens=cfg["max_num_batched_tokens"],
        enable_prefix_caching=cfg["enable_prefix_caching"], disable_log_stats=False,
        # the KV cache is sized by num_gpu_blocks; on CPU this fraction of RAM must merely be free at start
        gpu_memory_utilization=0.1,
        kv_transfer_config=KVTransferConfig(**kv) if kv else None,
    )
    results = []
    for step in spec["steps"]:
        if step["op"] == "reset":
            results.append({"op": "reset", "ok": bool(llm.reset_prefix_cache())})
            continue
        params = SamplingParams(temperature=0.0, max_tokens=step["max_tokens"], ignore_eos=True, logprobs=0)
        before = _counters(llm)
        start = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in step["prompts"]], params, use_tqdm=False)
        wall = time.perf_counter() - start
        after = _counters(llm)
        requests = []
        for o in outs:
            c = o.outputs[0]
            m = o.metrics
            requests.append({
                "tokens": list(c.token_ids),
                "logprobs": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)],
                "num_cached_tokens": o.num_cached_tokens or 0,
                "ttft_s": getattr(m, "first_token_latency", None),
            })
        results.append({"op": "generate", "requests": requests, "wall_s": wall}
                       | {k: after[k] - before[k] for k in after})
    Path(sys.argv[2]).write_text(json.dumps(results))


# ====================================================================== benchmark
#: The benchmark's model: big enough that a prompt's prefill dominates a request on a CPU
#: (about 21M parameters: ~40 MFLOP per prompt token against a few ms of engine overhead per step),
#: small enough that the whole replay takes minutes on 2 cores.
BENCH_MODEL = TinyLlama(hidden=512, layers=6, heads=8, kv_heads=4, intermediate=1536, vocab=2048, seed=1)


def trace_prompts(path: str | Path, n: int, tokens_per_block: int, max_blocks: int, vocab: int, first_word: int, seed: int = 0,
                  *, window: str = "sample") -> list[dict[str, Any]]:
    """``n`` requests of a Mooncake trace as token prompts: block hash ``h`` becomes
    ``tokens_per_block`` words drawn by a generator seeded with (``seed``, ``h``), so equal hashes
    give equal tokens; prompts keep their first ``max_blocks`` blocks.

    ``window="first"`` takes the trace's first ``n`` requests. ``"sample"`` takes a miniature of
    the whole trace: whole conversations, each kept with probability ``n / len(trace)`` (seeded by
    its key), their requests in trace order, at most ``n``. Spatial sampling as in SHARDS
    (Waldspurger et al., FAST'15), by conversation instead of by key so that every kept request
    keeps its whole prefix chain: a conversation's turns stay in order while the requests between
    them thin out by the sampling rate, so reuse distances shrink by it too. (A trace's follow-up
    turns arrive hundreds of requests later, so its first few hundred requests share almost
    nothing.) A conversation is named by the first block after the prefix every request shares
    (the system prompt)."""
    import numpy as np

    with open(path) as f:
        lines = (line for line in f if line.strip())
        reqs = [json.loads(line) for line, _ in zip(lines, range(n))] if window == "first" else [json.loads(line) for line in lines]
    if window != "first":
        common = len(os.path.commonprefix([r["hash_ids"] for r in reqs]))
        rate = min(1.0, n / len(reqs))

        def kept(req: dict[str, Any]) -> bool:
            key = req["hash_ids"][common] if len(req["hash_ids"]) > common else -1
            return np.random.default_rng([seed, key % 2**63]).random() < rate

        reqs = [r for r in reqs if kept(r)][:n]
    out = []
    for req in reqs:
        hashes = req["hash_ids"][:max_blocks]
        tokens = [int(t) for h in hashes
                  for t in np.random.default_rng([seed, h]).integers(first_word, vocab, tokens_per_block)]
        out.append({"tokens": tokens, "output_length": int(req["output_length"])})
    return out


def _percentile(xs: Sequence[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(xs, dtype=float), q))


def _row(name: str, steps: list[dict[str, Any]], wall: float, host_bytes: int) -> dict[str, Any]:
    reqs = [r for s in steps for r in s["requests"]]
    prompt = sum(s["prompt_tokens"] for s in steps)
    device = sum(s["device_hits"] for s in steps)
    connector = sum(s["connector_hits"] for s in steps)
    ttft = [r["ttft_s"] for r in reqs]
    generated = sum(len(r["tokens"]) for r in reqs)
    run_wall = sum(s["wall_s"] for s in steps)
    return {
        "row": name, "requests": len(reqs), "ttft_p50_ms": 1e3 * _percentile(ttft, 50), "ttft_p99_ms": 1e3 * _percentile(ttft, 99),
        "prompt_tokens": int(prompt), "prompt_tokens_computed": int(prompt - device - connector),
        "tokens_from_vllm_cache": int(device), "tokens_from_host_tier": int(connector),
        "throughput_tok_s": (prompt + generated) / run_wall, "replay_wall_s": run_wall, "engine_wall_s": wall,
        "host_tier_bytes": host_bytes,
    }


ROWS = ("vllm", "kvstore", "offloading")


def _rows(text: str) -> list[str]:
    """A comma-separated, non-empty list of distinct rows from :data:`ROWS`."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in ROWS]
    if not names or bad or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct rows from {', '.join(ROWS)} (comma-separated), got {text!r}")
    return names


def _trace_file(text: str) -> str:
    if not Path(text).expanduser().is_file():
        raise argparse.ArgumentTypeError(f"no trace file at {text!r}")
    return text


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    from .common import output_file, plot_file, positive_int

    parser.add_argument("--trace", type=_trace_file, default=None,
                        help="Mooncake-format JSONL trace (default: the shared Mooncake conversation trace, found from any directory)")
    parser.add_argument("--requests", type=positive_int, default=200, help="replay N requests of the trace (see --window)")
    parser.add_argument("--window", choices=("sample", "first"), default="sample",
                        help="sample: whole conversations sampled at rate N/len(trace), a miniature of the whole trace "
                             "(SHARDS-style); first: the trace's first N requests")
    parser.add_argument("--tokens-per-block", type=positive_int, default=32,
                        help="tokens per trace block (Mooncake's are 512; shortened to vLLM's block, so a shared hash is a shared vLLM block)")
    parser.add_argument("--max-blocks", type=positive_int, default=32, help="keep a prompt's first N trace blocks (keeps a row to minutes)")
    parser.add_argument("--max-tokens", type=positive_int, default=4, help="tokens generated per request (capped by the trace's output_length)")
    parser.add_argument("--gpu-blocks", type=positive_int, default=64, help="vLLM's KV-cache size in blocks of 32 tokens, the same in every row")
    parser.add_argument("--host-blocks", type=positive_int, default=1024, help="kvstore's host tier in blocks of 32 tokens")
    parser.add_argument("--rows", type=_rows, default=list(ROWS), help=f"rows to run, comma-separated: {', '.join(ROWS)}")
    parser.add_argument("--json", type=output_file, default=None, metavar="OUT", help="write the figures as JSON to OUT (checked writable before the run)")
    parser.add_argument("--plot", type=plot_file, default=None, metavar="OUT.png", help="plot TTFT and computed tokens per row to OUT.png (checked before the run)")


def main(args: argparse.Namespace) -> int:
    from kvstore._locate import default_trace

    from .common import Progress, print_table, save_figure, write_json

    args.trace = args.trace or str(default_trace())
    s = BENCH_MODEL
    block = CPU_BLOCK_MULTIPLE
    prompts = trace_prompts(args.trace, args.requests, args.tokens_per_block, args.max_blocks, s.vocab, s.first_word, window=args.window)
    longest = max(len(p["tokens"]) for p in prompts) + args.max_tokens
    max_len = -(-longest // block) * block
    block_bytes = s.layers * 2 * block * s.kv_heads * s.head_dim * 4  # float32 K and V of one block
    steps = [{"op": "generate", "prompts": [p["tokens"]], "max_tokens": max(1, min(args.max_tokens, p["output_length"]))} for p in prompts]
    # one warm-up request first (one-time costs of the first forward pass), left out of the figures;
    # its token (a special id) appears in no trace prompt, so it shares no block with them
    warmup = {"op": "generate", "prompts": [[0] * block], "max_tokens": 1}
    rows_cfg = {
        "vllm": (None, 0),
        "kvstore": (kvstore_transfer_config(host_blocks=args.host_blocks, policy="asym"), args.host_blocks * block_bytes),
        "offloading": ({"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
                        "kv_connector_extra_config": {"cpu_bytes_to_use": args.host_blocks * block_bytes, "block_size": block,
                                                      "eviction_policy": "kvstore_asym",
                                                      "cache_policy_module_path": "kvstore.integrations.vllm"}},
                       args.host_blocks * block_bytes),
    }
    rows, skipped = [], {}
    with tempfile.TemporaryDirectory(prefix="kvstore-bench-engine-") as tmp:
        model = str(write_llama(Path(tmp) / "model", s))
        with Progress("bench engine", total=len(args.rows)) as progress:
            for name in args.rows:
                progress.step(f"{name}: {len(steps)} requests through one vLLM engine (a subprocess)")
                transfer, host_bytes = rows_cfg[name]
                cfg = EngineConfig(model=model, block_size=block, num_gpu_blocks=args.gpu_blocks, max_model_len=max_len,
                                   max_num_batched_tokens=max_len, kv_transfer_config=transfer)
                start = time.perf_counter()
                try:
                    out = run_engine(cfg, [warmup, *steps], timeout=1800)[1:]
                except RuntimeError as e:
                    skipped[name] = str(e).strip().splitlines()[-1][:300]
                    continue
                rows.append(_row(name, out, time.perf_counter() - start, host_bytes))
    columns = {"row": "row", "ttft_p50_ms": "TTFT p50 ms", "ttft_p99_ms": "TTFT p99 ms", "prompt_tokens_computed": "prompt tokens computed",
               "tokens_from_vllm_cache": "from vLLM's cache", "tokens_from_host_tier": "from host tier",
               "throughput_tok_s": "throughput tok/s", "host_tier_bytes": "host-tier bytes"}
    print_table(f"engine replay: {len(prompts)} requests of {args.trace}", list(columns.values()),
                [[round(r[c], 1) if isinstance(r[c], float) else r[c] for c in columns] for r in rows])
    for name, why in skipped.items():
        print(f"{name}: did not run: {why}")
    result = {"model": asdict(s), "requests": len(prompts), "window": args.window, "tokens_per_block": args.tokens_per_block, "max_blocks": args.max_blocks,
              "gpu_blocks": args.gpu_blocks, "host_blocks": args.host_blocks, "block_size": block, "rows": rows, "skipped": skipped}
    write_json(args.json, result)
    if args.plot and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        names = [r["row"] for r in rows]
        axes[0].bar(names, [r["ttft_p50_ms"] for r in rows], label="p50")
        axes[0].scatter(names, [r["ttft_p99_ms"] for r in rows], color="k", zorder=3, label="p99")
        axes[0].set_ylabel("TTFT (ms)")
        axes[0].legend()
        axes[1].bar(names, [r["prompt_tokens_computed"] for r in rows])
        axes[1].set_ylabel("prompt tokens computed")
        fig.suptitle(f"{len(prompts)} requests, same KV cache ({args.gpu_blocks} blocks)")
        fig.tight_layout()
        save_figure(fig, args.plot)
    return 0


# ====================================================================== the OpenAI server
@contextmanager
def openai_server(config: EngineConfig, port: int, *, startup_s: float = 300.0) -> Iterator[str]:
    """vLLM's OpenAI server on ``config`` as a subprocess; yields its base URL and stops it after.

    ``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` is broken in vllm-cpu 0.32.0:
    it looks up the ``vllm`` distribution). ``VLLM_SERVER_DEV_MODE=1`` enables ``/reset_prefix_cache``;
    ``--enable-prompt-tokens-details`` reports ``usage.prompt_tokens_details.cached_tokens``.
    """
    import urllib.request

    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", config.model, "--dtype", "float32",
           "--seed", "0", "--enforce-eager", "--block-size", str(config.block_size),
           "--num-gpu-blocks-override", str(config.num_gpu_blocks), "--max-model-len", str(config.max_model_len),
           "--max-num-batched-tokens", str(config.max_num_batched_tokens), "--gpu-memory-utilization", "0.1",
           "--host", "127.0.0.1", "--port", str(port), "--enable-prompt-tokens-details"]
    if not config.enable_prefix_caching:
        cmd.append("--no-enable-prefix-caching")
    if config.kv_transfer_config:
        cmd += ["--kv-transfer-config", json.dumps(dict(config.kv_transfer_config))]
    env = engine_env({"VLLM_SERVER_DEV_MODE": "1", **config.env}, config.pythonpath)
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + startup_s
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"OpenAI server did not start (rc={proc.returncode}):\n{log.read()[-6000:]}")
                try:
                    with urllib.request.urlopen(url + "/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def post(url: str, body: Mapping[str, Any] | None = None, timeout: float = 120.0) -> dict[str, Any]:
    """POST ``body`` as JSON to ``url``; the decoded JSON answer (``{}`` for an empty one)."""
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body or {}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        text = r.read().decode()
    return json.loads(text) if text.strip() else {}
