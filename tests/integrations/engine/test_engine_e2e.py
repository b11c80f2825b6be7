"""kvstore's connector inside real vLLM CPU engines, compared with vLLM alone (tokens, logprobs).

One reference engine (vLLM alone, no prefix cache) computes every prompt; each connector engine
runs one scripted scenario in its own subprocess (engines are shared between cases where the
cases do not disturb each other: every case starts with ``reset_prefix_cache``, which empties
vLLM's cache and leaves the host tier). Hits are counted by vLLM: ``num_cached_tokens`` per
request, and its prefix-cache counters split them into vLLM's own cache (``device_hits``) and
the connector's (``connector_hits``).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BLOCK = 32
GPU_BLOCKS = 24  # vLLM's KV cache: 768 tokens, so the head/tail case can evict a prompt's tail
MAX_LEN = (GPU_BLOCKS - 1) * BLOCK  # vLLM keeps one null block
MAX_TOKENS = 8
#: float32 on CPU: a prompt computed in pieces (cached prefix + new tokens) differs from one
#: computed whole by rounding only (~1e-6 in logprobs); the corrupted control moves them by > 0.1.
LOGPROB_TOL = 1e-3

_rng = random.Random(16)


def _words(n: int) -> list[int]:
    return [_rng.randrange(3, 512) for _ in range(n)]


A = _words(8 * BLOCK)
B = A[: 6 * BLOCK] + _words(3 * BLOCK)  # shares 6 blocks with A
SYS = _words(4 * BLOCK)
Q = [SYS + _words(2 * BLOCK + 5 * i) for i in range(5)]  # Q[0] seeds the host tier, Q[1:] the batch
C = _words(16 * BLOCK)
D = _words(12 * BLOCK)  # filler that evicts C's tail from vLLM's cache
E = _words(16 * BLOCK)
F = E[: 10 * BLOCK] + _words(4 * BLOCK)  # shares 10 blocks (320 tokens) with E
G = _words(16 * BLOCK)
PROMPTS = {name: p for name, p in dict(A=A, B=B, C=C, D=D, E=E, F=F, G=G).items()} | {f"Q{i}": q for i, q in enumerate(Q)}
KEYS = {tuple(p): name for name, p in PROMPTS.items()}


def gen(*names: str) -> dict:
    return {"op": "generate", "prompts": [PROMPTS[n] for n in names], "max_tokens": MAX_TOKENS}


RESET = {"op": "reset"}


def engine(h, model: str, transfer: dict | None, **kw):
    return h.EngineConfig(model=model, block_size=BLOCK, num_gpu_blocks=kw.pop("gpu_blocks", GPU_BLOCKS),
                          max_model_len=MAX_LEN, max_num_batched_tokens=MAX_LEN, kv_transfer_config=transfer, **kw)


@pytest.fixture(scope="module")
def reference(engine_harness, tiny_llama):
    """vLLM alone, prefix caching off: name -> its request result."""
    names = list(PROMPTS)
    cfg = engine(engine_harness, tiny_llama, None, enable_prefix_caching=False)
    (step,) = engine_harness.run_engine(cfg, [gen(*names)])
    return dict(zip(names, step["requests"]))


def assert_same(reference, step, names):
    for name, got in zip(names, step["requests"], strict=True):
        want = reference[name]
        assert got["tokens"] == want["tokens"], f"{name}: tokens {got['tokens']} != vLLM alone {want['tokens']}"
        diff = max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"], strict=True))
        assert diff <= LOGPROB_TOL, f"{name}: logprobs differ from vLLM alone by {diff:.3g} > {LOGPROB_TOL}"


MAIN = [
    gen("A"), RESET, gen("A"),  # 0..2: cold, then served from the host tier
    RESET, gen("B"),  # 3..4: shares 6 blocks with A
    RESET, gen("Q0"), RESET, gen("Q1", "Q2", "Q3", "Q4"),  # 5..8: a batch on one system prompt
    RESET, gen("C"), gen("D"), gen("C"),  # 9..12: C's head from vLLM's cache, its tail from the host tier
]


@pytest.fixture(scope="module")
def main_run(engine_harness, tiny_llama):
    cfg = engine(engine_harness, tiny_llama, engine_harness.kvstore_transfer_config(host_blocks=256, policy="asym"))
    return engine_harness.run_engine(cfg, MAIN)


def test_cold_prompt_equals_vllm_alone(reference, main_run):
    assert_same(reference, main_run[0], ["A"])
    assert main_run[0]["requests"][0]["num_cached_tokens"] == 0


def test_repeat_after_reset_is_served_by_the_host_tier(reference, main_run):
    step = main_run[2]
    assert_same(reference, step, ["A"])
    cached = step["requests"][0]["num_cached_tokens"]
    # vLLM computes at least the prompt's last token, so its last full block is not loaded
    assert cached == len(A) - BLOCK
    assert step["connector_hits"] == cached and step["device_hits"] == 0


def test_prompt_sharing_a_prefix_loads_the_shared_blocks(reference, main_run):
    step = main_run[4]
    assert_same(reference, step, ["B"])
    assert step["requests"][0]["num_cached_tokens"] == 6 * BLOCK == step["connector_hits"]


def test_batch_sharing_a_system_prompt(reference, main_run):
    assert_same(reference, main_run[6], ["Q0"])
    step = main_run[8]
    assert_same(reference, step, ["Q1", "Q2", "Q3", "Q4"])
    for r in step["requests"]:
        assert r["num_cached_tokens"] >= len(SYS)
    assert step["device_hits"] + step["connector_hits"] == sum(r["num_cached_tokens"] for r in step["requests"])
    assert step["connector_hits"] >= len(SYS)


def test_head_from_vllm_cache_tail_from_host_tier(reference, main_run):
    assert_same(reference, main_run[11], ["D"])
    step = main_run[12]
    assert_same(reference, step, ["C"])
    assert step["requests"][0]["num_cached_tokens"] == len(C) - BLOCK
    assert step["device_hits"] > 0 and step["connector_hits"] > 0, step


def test_host_block_twice_vllm_block(engine_harness, tiny_llama, reference):
    cfg = engine(engine_harness, tiny_llama, engine_harness.kvstore_transfer_config(host_blocks=128, block_size=2 * BLOCK))
    run = engine_harness.run_engine(cfg, [gen("A"), RESET, gen("A"), RESET, gen("B")])
    assert_same(reference, run[0], ["A"])
    assert_same(reference, run[2], ["A"])
    # host blocks of 64 tokens (4 for A); vLLM computes the prompt's last token, so the last host block
    # serves only its first vLLM-size piece
    assert run[2]["connector_hits"] == len(A) - BLOCK == run[2]["requests"][0]["num_cached_tokens"]
    assert_same(reference, run[4], ["B"])
    assert run[4]["connector_hits"] == 6 * BLOCK


SMALL_HOST = 6  # host blocks: less than half of E's 16


@pytest.fixture(scope="module", params=["asym", "lru"])
def small_run(request, engine_harness, tiny_llama):
    cfg = engine(engine_harness, tiny_llama, engine_harness.kvstore_transfer_config(host_blocks=SMALL_HOST, policy=request.param))
    return engine_harness.run_engine(cfg, [gen("E"), RESET, gen("F"), RESET, gen("G"), RESET, gen("E"), gen("F")])


def test_small_host_tier_output_equals_vllm_alone(reference, small_run):
    for i, name in [(0, "E"), (2, "F"), (4, "G"), (6, "E"), (7, "F")]:
        assert_same(reference, small_run[i], [name])
        r = small_run[i]["requests"][0]
        assert r["num_cached_tokens"] <= SMALL_HOST * BLOCK + (small_run[i]["device_hits"])


def test_small_host_tier_serves_the_sharers_prefix(small_run):
    # E's first blocks fit the tier; F shares 10 blocks with E
    assert small_run[2]["connector_hits"] > 0


def test_corrupted_loads_change_the_output(engine_harness, tiny_llama, reference):
    here = str(Path(__file__).parent)
    transfer = engine_harness.kvstore_transfer_config(host_blocks=128) | {
        "kv_connector": "CorruptingConnector", "kv_connector_module_path": "corrupting_connector"}
    run = engine_harness.run_engine(engine(engine_harness, tiny_llama, transfer, pythonpath=(here,)), [gen("A"), RESET, gen("A")])
    assert_same(reference, run[0], ["A"])  # nothing loaded yet: unchanged
    assert run[2]["connector_hits"] == len(A) - BLOCK
    with pytest.raises(AssertionError, match="differ from vLLM alone|tokens"):
        assert_same(reference, run[2], ["A"])


def test_openai_server_reports_host_tier_hits_after_reset(engine_harness, tiny_llama, reference):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = engine(engine_harness, tiny_llama, engine_harness.kvstore_transfer_config(host_blocks=128))
    body = {"model": tiny_llama, "prompt": A, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True, "logprobs": 0}
    with engine_harness.openai_server(cfg, port) as url:
        cold = engine_harness.post(url + "/v1/completions", body)
        engine_harness.post(url + "/reset_prefix_cache")
        warm = engine_harness.post(url + "/v1/completions", body)
    want = reference["A"]
    for got in (cold, warm):
        choice = got["choices"][0]
        assert choice["text"].split() == engine_harness.words(want["tokens"]).split()
        diff = max(abs(a - b) for a, b in zip(choice["logprobs"]["token_logprobs"], want["logprobs"], strict=True))
        assert diff <= LOGPROB_TOL
    assert (cold["usage"]["prompt_tokens_details"] or {}).get("cached_tokens", 0) == 0
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] == len(A) - BLOCK


def test_two_engines_share_a_prefix_through_the_remote_tier(engine_harness, tiny_llama, reference, redis_server):
    """Engine A computes A (and B, which shares 6 blocks); engine B, another process with an
    empty host tier, is served A's prefix from the shared redis-server; both equal vLLM alone.
    Then the server dies: engine C recomputes everything and still equals vLLM alone."""
    transfer = engine_harness.kvstore_transfer_config(host_blocks=128, cold_tier={"remote_url": redis_server.url, "timeout_s": 0.5})
    (first,) = engine_harness.run_engine(engine(engine_harness, tiny_llama, transfer), [gen("A")])
    assert_same(reference, first, ["A"])
    assert first["requests"][0]["num_cached_tokens"] == 0
    assert redis_server.client().dbsize() == 2 * len(A) // BLOCK  # every full block written through (value + metadata)
    second = engine_harness.run_engine(engine(engine_harness, tiny_llama, transfer), [gen("A"), RESET, gen("B")])
    assert_same(reference, second[0], ["A"])
    assert second[0]["connector_hits"] == len(A) - BLOCK  # all but the last block, which vLLM computes
    assert_same(reference, second[2], ["B"])
    assert second[2]["connector_hits"] == 6 * BLOCK
    redis_server.kill()
    (third,) = engine_harness.run_engine(engine(engine_harness, tiny_llama, transfer), [gen("A")])
    assert_same(reference, third, ["A"])
    assert third["connector_hits"] == 0
