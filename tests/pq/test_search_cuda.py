"""Fused PQ search kernel (csrc/pq_search.cu): input checks and planning on any machine; on a
GPU, the kernel against the torch reference (kvstore.pq.adc.adc_topk): the same top-k sets up
to ties (a differing pick must score within float rounding of the k-th best)."""

from __future__ import annotations

import math

import pytest
import torch

from kvstore.errors import ConfigError, OutOfRangeError, ShapeError
from kvstore.pq import adc, search_cuda
from kvstore.pq.index import PQIndex
from kvstore.pq.kmeans import KMeansConfig
from kvstore.pq.search_cuda import BACKEND_ENV, adc_topk, adc_topk_cuda, plan_chunks, resolve_backend

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _inputs(R=2, N=300, M=4, Q=4, K=256, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, K, (R, N, M), generator=g, dtype=torch.int64).to(torch.uint8)
    tables = torch.randn(R, Q, M, K, generator=g)
    return codes.to(device), tables.to(device)


# ------------------------------------------------------------------------------ CPU: dispatch
def test_resolve_backend(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend(None, cpu) == "torch"  # the kernel is off by default
    assert resolve_backend("auto", cpu) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "gpu")
    with pytest.raises(ConfigError, match=r"\$KVSTORE_PQ_BACKEND='gpu'"):
        resolve_backend(None, cpu)
    with pytest.raises(ConfigError, match="backend='fast'"):
        resolve_backend("fast", cpu)
    with pytest.raises(ShapeError, match="needs CUDA tensors"):
        resolve_backend("cuda", cpu)


@pytest.mark.parametrize("aggregate", [None, "sum", "max"])
def test_torch_backend_is_the_reference(aggregate):
    codes, tables = _inputs()
    lo, hi = torch.tensor([4, 0]), torch.tensor([280, 300])
    got = adc_topk(codes, tables, 20, lo=lo, hi=hi, aggregate=aggregate, scale=0.125, backend="torch")
    want = adc.adc_topk(codes, tables, 20, lo=lo, hi=hi, aggregate=aggregate, scale=0.125)
    assert torch.equal(got, want)


def test_plan_chunks():
    chunk, n = plan_chunks(131072, 8, 132, min_chunk=4096)
    assert chunk % 16 == 0 and chunk >= 4096 and chunk * n >= 131072 and chunk * (n - 1) < 131072
    chunk, n = plan_chunks(100, 1, 132, min_chunk=1024)  # short rows: one CTA
    assert (chunk, n) == (1024, 1)
    chunk, n = plan_chunks(1 << 20, 1, 100, min_chunk=1024)  # one long row spreads over the GPU
    assert n == 400 and chunk == 2624
    with pytest.raises(ConfigError):
        plan_chunks(0, 1, 1, min_chunk=1)


# ---------------------------------------------------------------------------- CPU: validation
@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda c, t: (c.long(), t), ShapeError, "uint8"),
        (lambda c, t: (c[0], t), ShapeError, r"uint8 \[R, N, M\]"),
        (lambda c, t: (c, t.double()), ShapeError, "float32"),
        (lambda c, t: (c, t[:1]), ShapeError, "do not match"),
        (lambda c, t: (c, t[..., :100]), ShapeError, "power of two"),
        (lambda c, t: (c, torch.randn(2, 9, 4, 256)), ShapeError, "at most 8 query heads"),
    ],
)
def test_bad_inputs_raise_typed_errors(mutate, error, match):
    codes, tables = _inputs()
    codes, tables = mutate(codes, tables)
    with pytest.raises(error, match=match):
        adc_topk_cuda(codes, tables, 10, aggregate="sum")


def test_bad_arguments_raise_typed_errors():
    codes, tables = _inputs()
    with pytest.raises(OutOfRangeError, match="k=301"):
        adc_topk_cuda(codes, tables, 301)
    with pytest.raises(OutOfRangeError, match="k=0"):
        adc_topk_cuda(codes, tables, 0)
    with pytest.raises(ConfigError, match="aggregate"):
        adc_topk_cuda(codes, tables, 5, aggregate="mean")
    with pytest.raises(ConfigError, match="scale"):
        adc_topk_cuda(codes, tables, 5, aggregate="sum", scale=float("nan"))
    with pytest.raises(ShapeError, match="lo must be an int64"):
        adc_topk_cuda(codes, tables, 5, lo=torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ShapeError, match=r"hi must be an int64 \[2\]"):
        adc_topk_cuda(codes, tables, 5, hi=torch.tensor([1, 2, 3]))


def test_cpu_tensors_are_refused_by_the_kernel_path():
    codes, tables = _inputs()
    with pytest.raises(ShapeError, match="needs CUDA tensors, got codes on cpu"):
        adc_topk_cuda(codes, tables, 5, aggregate="sum")
    with pytest.raises(ShapeError, match="needs CUDA tensors"):
        adc_topk(codes, tables, 5, aggregate="sum", backend="cuda")


def test_kernel_instantiations_compile_with_nvrtc(nvrtc):
    """What cupy.RawModule will do on the GPU box, done here without a GPU."""
    from kvstore._locate import csrc_path

    names = ["pq_stats<4, 4, true>", "pq_rank<4, 4, true>", "pq_rank<4, 8, false>", "pq_rank<3, 1, false>", "pq_stats<16, 2, true>"]
    for source, exprs in (("pq_search.cu", names), ("block_gather.cu", [])):
        prog = nvrtc.createProgram(csrc_path(source).read_text(), source, [], [])
        for e in exprs:
            nvrtc.addNameExpression(prog, e)
        try:
            nvrtc.compileProgram(prog, ["-std=c++17", "-arch=compute_90"])
        except Exception:
            pytest.fail(f"NVRTC failed on {source}:\n{nvrtc.getProgramLog(prog)}")
        assert all(nvrtc.getLoweredName(prog, e) for e in exprs)


# ------------------------------------------------------------------------- GPU: vs reference
def _values(codes, tables, lo, hi, aggregate, scale):
    """The reference's ranking values ``[R, Q, N]`` (aggregate None) or ``[R, N]``; -inf outside [lo, hi)."""
    s = adc.adc_scores(codes, tables).double()
    n = torch.arange(s.shape[-1], device=s.device)
    outside = torch.zeros((s.shape[0], s.shape[-1]), dtype=torch.bool, device=s.device)
    if lo is not None:
        outside |= n < lo[:, None]
    if hi is not None:
        outside |= n >= hi[:, None]
    s = s.masked_fill(outside[:, None], -math.inf)
    if aggregate is None or tables.shape[1] == 1:
        return s if aggregate is None else s[:, 0]
    p = torch.softmax(s * scale, -1).nan_to_num(0.0)
    return p.sum(1) if aggregate == "sum" else p.amax(1)


def _assert_same_up_to_ties(got, values, k):
    """Every row: k distinct indices; each pick is at least the k-th best value minus rounding."""
    got, values = got.reshape(-1, k).cpu(), values.reshape(-1, values.shape[-1]).cpu()
    for r in range(got.shape[0]):
        assert got[r].unique().numel() == k
        v = values[r]
        kth = v.topk(k).values[-1]
        picked = v[got[r]]
        finite = torch.isfinite(kth)
        tol = 1e-5 * kth.abs() + 1e-7 if finite else 0
        assert bool((picked >= kth - tol).all() if finite else True), f"row {r}: a pick scores below the k-th best"
        if finite:  # every strictly-better token is picked
            must = (v > kth + tol).nonzero().flatten()
            assert torch.isin(must, got[r]).all(), f"row {r}: a clearly better token was missed"


CASES = [
    # R, N, M, Q, K, aggregate, k, bounds
    (4, 5000, 4, 4, 256, "sum", 300, True),
    (4, 5000, 4, 4, 256, "max", 300, True),
    (2, 4099, 4, 4, 256, None, 64, True),
    (3, 20000, 4, 1, 256, "sum", 1000, True),
    (2, 3001, 3, 7, 64, "sum", 200, True),  # scalar path, Q padded to 8
    (2, 6000, 8, 2, 16, "sum", 2500, False),
    (1, 70000, 16, 4, 256, "sum", 4000, True),
    (2, 777, 4, 4, 256, "sum", 777, False),  # k = N: everything
]


@requires_cuda
@pytest.mark.parametrize("R, N, M, Q, K, aggregate, k, bounds", CASES)
def test_kernel_matches_reference(R, N, M, Q, K, aggregate, k, bounds):
    codes, tables = _inputs(R, N, M, Q, K, seed=N, device="cuda")
    lo = hi = None
    if bounds:
        lo = torch.arange(R, device="cuda", dtype=torch.int64) * 3 + 4
        hi = N - 16 - torch.arange(R, device="cuda", dtype=torch.int64)
    scale = 1 / math.sqrt(128)
    got = adc_topk_cuda(codes, tables, k, lo=lo, hi=hi, aggregate=aggregate, scale=scale)
    want = adc.adc_topk(codes, tables, k, lo=lo, hi=hi, aggregate=aggregate, scale=scale)
    assert got.shape == want.shape and got.dtype == torch.int64
    values = _values(codes, tables, lo, hi, aggregate, scale)
    _assert_same_up_to_ties(got, values, k)
    # sorted by decreasing value, as the reference
    v = torch.gather(values.reshape(-1, N), 1, got.reshape(-1, k)).cpu()
    assert bool((v[:, :-1] >= v[:, 1:] - 1e-5 * v[:, :-1].abs()).all())


@requires_cuda
def test_kernel_with_fewer_candidates_than_k():
    codes, tables = _inputs(2, 600, 4, 4, 256, device="cuda")
    lo, hi = torch.tensor([0, 100], device="cuda"), torch.tensor([50, 120], device="cuda")
    got = adc_topk_cuda(codes, tables, 64, lo=lo, hi=hi, aggregate="sum").cpu()
    for r, (a, b) in enumerate([(0, 50), (100, 120)]):
        cand = set(range(a, b))
        assert cand <= set(got[r].tolist()) and got[r].unique().numel() == 64  # all candidates, then fill


@requires_cuda
def test_kernel_on_pq_index_codes_and_repeated_launches():
    """PQIndex.codes is a strided view of a larger buffer; the workspace is reused across launches."""
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(2, 3000, 64, generator=g).cuda()
    index = PQIndex(64, num_subspaces=4, bits=8, kmeans=KMeansConfig(num_iters=2))
    index.train(keys)
    index.add(keys)
    index.add(keys[:, :37])  # ntotal = 3037: codes are a view with a larger row stride
    q = torch.randn(2, 4, 64, generator=g).cuda()
    tables = index.lookup_tables(q)
    codes = index.codes
    assert codes.stride(0) != codes.shape[1] * codes.shape[2]
    for trial in range(3):
        got = adc_topk_cuda(codes, tables, 100, aggregate="sum", scale=0.125)
        _assert_same_up_to_ties(got, _values(codes, tables, None, None, "sum", 0.125), 100)


@requires_cuda
def test_kernel_refuses_misplaced_tensors():
    codes, tables = _inputs(device="cuda")
    with pytest.raises(ShapeError, match="tables is on cpu"):
        adc_topk_cuda(codes, tables.cpu(), 5)
    with pytest.raises(ShapeError, match="contiguous"):
        adc_topk_cuda(codes.transpose(1, 2).contiguous().transpose(1, 2), tables, 5)
