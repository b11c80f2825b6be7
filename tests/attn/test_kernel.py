"""CUDA-kernel-only behaviour: strides, alignment, streams, long multi-chunk contexts.

(The kernel's numerical checks against the float64 truth live in test_attention.py, which runs
every case for backend="cuda" too.) Skipped without a CUDA device.
"""

from __future__ import annotations

import pytest
import torch

from kvstore.attn import BlockSegments, multi_segment_attention, paged_attention, reference
from kvstore.errors import ShapeError

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _inputs(lengths, hq=8, hkv=2, d=128, dtype=torch.float32, num_q=1, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(num_q, hq, d, device="cuda", generator=g).to(dtype)
    segs = [(torch.randn(n, hkv, d, device="cuda", generator=g).to(dtype),
             torch.randn(n, hkv, d, device="cuda", generator=g).to(dtype)) for n in lengths]  # fmt: skip
    return q, segs


def _truth64(q, segs):
    return reference.multi_segment_attention(q.double(), [(k.double(), v.double()) for k, v in segs])


def test_long_context_many_chunks_fp32():
    q, segs = _inputs([20000, 3, 4097], hq=32, hkv=8, num_q=2)
    out, lse = multi_segment_attention(q, segs, backend="cuda")
    t_out, t_lse = _truth64(q, segs)
    assert (out.double() - t_out).abs().max() <= 1e-5 * t_out.abs().max()
    assert (lse.double() - t_lse).abs().max() <= 1e-5 * t_lse.abs().max()


def test_strided_query_and_segment_views():
    q_full, segs = _inputs([70, 33], hq=16, hkv=4, d=64)
    qkv = torch.randn(1, 3 * 16, 64, device="cuda")
    qkv[:, :16] = q_full
    q = qkv[:, :16]  # a view with a head stride inside a larger buffer
    out, lse = multi_segment_attention(q, segs, backend="cuda")
    t_out, _ = _truth64(q, segs)
    assert (out.double() - t_out).abs().max() <= 1e-5 * t_out.abs().max()


def test_misaligned_rows_are_rejected():
    q, segs = _inputs([8], d=64)
    flat = torch.randn(8 * 2 * 64 + 1, device="cuda")
    k = flat[1:].view(8, 2, 64)  # starts 4 bytes into an allocation
    with pytest.raises(ShapeError, match="16-byte aligned"):
        multi_segment_attention(q, [(k, segs[0][1])], backend="cuda")


def test_runs_on_the_current_stream():
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        q, segs = _inputs([3000, 500], dtype=torch.bfloat16)
        pool = torch.randn(64, 16, 2, 128, device="cuda", dtype=torch.bfloat16)
        segments = BlockSegments.from_runs([list(range(0, 64, 2)), [1, 3, 5]], [16, 9], block_size=16, device="cuda")
        out, _ = paged_attention(q, pool, pool, segments, backend="cuda")
        ref, _ = paged_attention(q, pool, pool, segments, backend="torch")
    side.synchronize()
    assert (out.float() - ref.float()).abs().max() <= 2e-2
