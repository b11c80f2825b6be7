"""Multi-segment attention against a float64 full-attention truth.

Every test runs for the torch reference on the CPU and, when CUDA is available, for the CUDA
kernel (backend="cuda"); outputs are passed in poisoned with NaN so an unwritten entry fails.
fp16/bf16 kernel results must stay within 2x the reference's own error on the same inputs.
"""

from __future__ import annotations

import pytest
import torch
from attn_truth import (
    LAYER,
    PagedCase,
    TokenCase,
    check_against_truth,
    paged_inputs,
    rand,
    segments_truth,
    token_inputs,
    truth_attention,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.attn import BlockSegments, merge_states, multi_segment_attention, paged_attention, paged_token_attention
from kvstore.attn import reference

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TARGETS = [pytest.param(("torch", "cpu"), id="torch-cpu"), pytest.param(("cuda", "cuda"), id="cuda", marks=CUDA)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=TARGETS)
def target(request):
    return request.param


def poisoned(q: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "out": torch.full_like(q, float("nan")),
        "lse": torch.full(q.shape[:2], float("nan"), dtype=torch.float32, device=q.device),
    }


def baseline(backend: str, run, truth) -> float:
    """The reference's own max abs error on the same inputs (what a kernel may double)."""
    if backend == "torch":
        return 0.0
    out, _ = run("torch")
    return (out.double().cpu() - truth[0]).abs().max().item()


# ------------------------------------------------------------------------------ segment lists
SEGMENT_CASES = [
    # (segment lengths, Tq, Hq, Hkv, D, causal_last)
    ((1,), 1, 4, 1, 64, True),
    ((37, 1, 16), 1, 8, 1, 128, True),
    ((5, 1, 1, 29), 3, 8, 2, 64, True),
    ((64, 17), 4, 2, 2, 256, True),
    ((300, 1, 200), 1, 32, 8, 128, True),
    ((9, 12), 2, 4, 4, 128, False),
    ((0, 7, 0, 5), 2, 8, 2, 64, True),
    ((700, 6), 5, 8, 1, 64, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SEGMENT_CASES, ids=str)
def test_segment_list(target, case, dtype):
    backend, device = target
    lengths, num_q, hq, hkv, d, causal = case
    gen = torch.Generator().manual_seed(sum(lengths) + d)
    q = rand((num_q, hq, d), dtype, device, gen, 1.5)
    segments = [(rand((n, hkv, d), dtype, device, gen), rand((n, hkv, d), dtype, device, gen)) for n in lengths]
    truth = segments_truth(q, segments, causal_last=causal, scale=d**-0.5)

    def run(b, **outputs):
        return multi_segment_attention(q, segments, causal_last=causal, backend=b, **outputs)

    out, lse = run(backend, **poisoned(q))
    assert out.dtype == dtype and lse.dtype == torch.float32
    check_against_truth(out, lse, truth, dtype, baseline_err=baseline(backend, run, truth))


def test_segment_list_all_empty(target):
    backend, device = target
    q = torch.randn(2, 4, 64, device=device)
    empty = torch.zeros(0, 2, 64, device=device)
    out, lse = multi_segment_attention(q, [(empty, empty)], causal_last=False, backend=backend, **poisoned(q))
    assert torch.equal(out, torch.zeros_like(q))
    assert torch.isneginf(lse).all()


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=5).filter(lambda x: x[-1] >= 3),
    num_q=st.integers(1, 3),
    group=st.sampled_from([1, 4, 8]),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_reference_gathered_equals_merged_equals_truth(lengths, num_q, group, causal, seed):
    gen = torch.Generator().manual_seed(seed)
    hkv, d = 2, 64
    q = torch.randn(num_q, hkv * group, d, generator=gen)
    segments = [(torch.randn(n, hkv, d, generator=gen), torch.randn(n, hkv, d, generator=gen)) for n in lengths]
    truth = segments_truth(q, segments, causal_last=causal, scale=d**-0.5)
    for fn in (reference.multi_segment_attention, reference.multi_segment_attention_merged):
        out, lse = fn(q, segments, causal_last=causal)
        check_against_truth(out, lse, truth, torch.float32)


# ------------------------------------------------------------------------------ merge_states
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_states_recombines_a_split_sequence(target, dtype):
    backend, device = target
    gen = torch.Generator().manual_seed(7)
    num_q, hq, hkv, d = 3, 8, 2, 128
    q = rand((num_q, hq, d), torch.float32, device, gen, 1.5)
    k = rand((90, hkv, d), torch.float32, device, gen)
    v = rand((90, hkv, d), torch.float32, device, gen)
    cuts = [0, 1, 31, 31, 90]  # one 1-token part, one 0-token part
    parts = [multi_segment_attention(q, [(k[a:b], v[a:b])], causal_last=False, backend="torch")
             for a, b in zip(cuts, cuts[1:])]  # fmt: skip
    outs = torch.stack([o for o, _ in parts], dim=1).to(dtype)
    lses = torch.stack([l for _, l in parts], dim=1)
    assert torch.isneginf(lses[:, 2]).all(), "the empty part has LSE -inf"
    outs[:, 2] = float("nan")  # an empty state's output is never read
    out, lse = merge_states(outs, lses, backend=backend)
    truth = segments_truth(q, [(k, v)], causal_last=False, scale=d**-0.5)
    rounding = (outs.double().cpu() - torch.stack([o for o, _ in parts], 1).double().cpu()).nan_to_num().abs().max()
    check_against_truth(out, lse, truth, dtype, baseline_err=float(rounding))


def test_merge_states_all_empty_rows(target):
    backend, device = target
    outs = torch.full((2, 3, 4, 64), float("nan"), device=device)
    lses = torch.full((2, 3, 4), float("-inf"), device=device)
    lses[1, 2, 1] = 0.5
    outs[1, 2, 1] = 2.0
    out, lse = merge_states(outs, lses, backend=backend)
    assert torch.isneginf(lse[0]).all() and torch.equal(out[0], torch.zeros_like(out[0]))
    assert lse[1, 1].item() == pytest.approx(0.5) and torch.all(out[1, 1] == 2.0)
    assert torch.isneginf(lse[1, 0]) and torch.all(out[1, 0] == 0)


# ------------------------------------------------------------------------------ block tables
PAGED_CASES = [
    PagedCase(16, (1,), (1,), 1, 4, 4, 64, True),
    PagedCase(16, (3, 1, 2), (16, 1, 5), 1, 8, 2, 128, True),
    PagedCase(8, (5, 2, 1, 4), (3, 8, 1, 7), 4, 8, 1, 64, True),
    PagedCase(16, (2, 3), (16, 9), 2, 16, 2, 256, False),
    PagedCase(16, (40, 30), (16, 11), 1, 32, 8, 128, True),
    PagedCase(16, (1, 1, 1, 1, 1, 1), (1, 2, 3, 16, 1, 6), 3, 4, 1, 128, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PAGED_CASES, ids=str)
def test_paged_segments(target, case, dtype):
    backend, device = target
    pool, runs, q, truth = paged_inputs(case, dtype, device)
    segments = BlockSegments.from_runs(runs, case.last_block_tokens, block_size=case.block_size, device=device)
    k_cache, v_cache = pool.layer_view(LAYER, 0), pool.layer_view(LAYER, 1)
    assert not k_cache.is_contiguous()

    def run(b, **outputs):
        return paged_attention(q, k_cache, v_cache, segments, causal_last=case.causal, backend=b, **outputs)

    out, lse = run(backend, **poisoned(q))
    check_against_truth(out, lse, truth, dtype, baseline_err=baseline(backend, run, truth))


def test_paged_equals_segment_list(target):
    """The block-table API and the tensor-list API agree on the same tokens."""
    backend, device = target
    case = PagedCase(16, (4, 2, 3), (16, 7, 2), 2, 8, 2, 128, True)
    pool, runs, q, _ = paged_inputs(case, torch.float32, device, seed=3)
    segments = BlockSegments.from_runs(runs, case.last_block_tokens, block_size=16, device=device)
    k_cache, v_cache = pool.layer_view(LAYER, 0), pool.layer_view(LAYER, 1)
    slot, offset = segments.token_slots()
    bounds = segments.block_start[torch.tensor([0, 4, 6, 9])].tolist()
    k, v = k_cache[slot, offset], v_cache[slot, offset]
    listed = [(k[a:b], v[a:b]) for a, b in zip(bounds, bounds[1:])]
    out_list, lse_list = multi_segment_attention(q, listed, backend=backend)
    out_paged, lse_paged = paged_attention(q, k_cache, v_cache, segments, backend=backend)
    torch.testing.assert_close(out_paged, out_list, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse_paged, lse_list, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ token sets
TOKEN_CASES = [
    TokenCase(16, 10, 20, 1, 8, 2, 128, 150),
    TokenCase(8, 5, 1, 2, 4, 1, 64, None),
    TokenCase(16, 64, 300, 3, 32, 8, 128, 1000),
    TokenCase(16, 8, 33, 4, 8, 8, 256, 120),
    TokenCase(4, 7, 9, 1, 8, 1, 64, None),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", TOKEN_CASES, ids=str)
def test_token_sets(target, case, dtype):
    backend, device = target
    pool, block_table, positions, q, truth = token_inputs(case, dtype, device)
    k_cache, v_cache = pool.layer_view(LAYER, 0), pool.layer_view(LAYER, 1)

    def run(b, **outputs):
        return paged_token_attention(q, k_cache, v_cache, block_table, positions, seq_len=case.seq_len, backend=b,
                                     **outputs)  # fmt: skip

    out, lse = run(backend, **poisoned(q))
    check_against_truth(out, lse, truth, dtype, baseline_err=baseline(backend, run, truth))


def test_token_sets_empty_selection(target):
    backend, device = target
    case = TokenCase(16, 4, 0, 1, 8, 2, 64, None)
    pool, block_table, positions, q, _ = token_inputs(case, torch.float32, device)
    out, lse = paged_token_attention(q, pool.layer_view(0, 0), pool.layer_view(0, 1), block_table, positions,
                                     backend=backend, **poisoned(q))  # fmt: skip
    assert torch.equal(out, torch.zeros_like(q)) and torch.isneginf(lse).all()


def test_token_sets_equal_paged_when_heads_share_tokens(target):
    """Every head selecting all tokens of a sequence is plain paged attention over it."""
    backend, device = target
    case = PagedCase(16, (3,), (9,), 2, 8, 2, 64, True)
    pool, runs, q, truth = paged_inputs(case, torch.float32, device, seed=5)
    k_cache, v_cache = pool.layer_view(LAYER, 0), pool.layer_view(LAYER, 1)
    table = torch.tensor(runs[0], dtype=torch.int32, device=device)
    positions = torch.arange(41, dtype=torch.int32, device=device).expand(2, -1).contiguous()
    out, lse = paged_token_attention(q, k_cache, v_cache, table, positions, seq_len=41, backend=backend)
    check_against_truth(out, lse, truth, torch.float32)


def test_truth_helper_is_plain_softmax():
    """The truth itself: one head, no mask, against a hand-written softmax."""
    q = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    v = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    out, lse = truth_attention(q, [k], [v], [[[True, True]]], 1.0)
    e = torch.tensor([1.0, 0.0], dtype=torch.float64).exp()
    assert torch.allclose(out[0, 0], (e / e.sum()) @ v)
    assert lse[0, 0].item() == pytest.approx(e.sum().log().item())
