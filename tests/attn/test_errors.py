"""Bad input raises a typed error naming the value, and leaves caller-given outputs untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstore.attn import (
    BACKEND_ENV,
    BlockSegments,
    merge_states,
    multi_segment_attention,
    paged_attention,
    paged_token_attention,
    resolve_backend,
)
from kvstore.errors import ConfigError, KernelError, OutOfRangeError, ShapeError

CPU = torch.device("cpu")


def seg(n: int, hkv: int = 2, d: int = 64, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(n)
    k = torch.randn(n, hkv, d, generator=g).to(dtype).to(device)
    return k, torch.randn(n, hkv, d, generator=g).to(dtype).to(device)


def q_of(tq: int = 1, hq: int = 8, d: int = 64, dtype=torch.float32, device="cpu"):
    return torch.randn(tq, hq, d).to(dtype).to(device)


@pytest.mark.parametrize(
    ("q", "segments", "match"),
    [
        (torch.randn(8, 64), [seg(4)], r"\[Tq, Hq, D\]"),
        (q_of(dtype=torch.float64), [seg(4)], "q.dtype"),
        (q_of(d=96), [seg(4, d=96)], "head_dim must be one of"),
        (q_of(hq=6), [seg(4, hkv=4)], "Hq=6 must be a multiple of KV heads Hkv=4"),
        (q_of(), [seg(4, dtype=torch.float16)], "differs from q.dtype"),
        (q_of(), [seg(4, d=128)], "head_dim 128"),
        (q_of(), [(seg(4)[0], seg(5)[1])], r"k \(4, 2, 64\) and v \(5, 2, 64\) differ"),
        (q_of(), [seg(4), seg(3, hkv=4)], "segments\\[1\\] has 4 KV heads"),
        (q_of(), [seg(4)[0]], "must be a \\(k, v\\) pair"),
        (q_of(), seg(4), "must be a \\(k, v\\) pair"),
        (q_of(tq=3), [seg(9), seg(2)], "3 queries must be the last tokens .* only 2 tokens"),
        (q_of(), [], "at least one segment"),
        (q_of(), [(seg(4)[0], seg(4)[1].to("meta"))], "on meta"),
    ],
)
def test_segment_list_errors(q, segments, match):
    with pytest.raises(ShapeError, match=match):
        multi_segment_attention(q, segments)


def test_bad_scale_and_outputs_leave_outputs_untouched():
    q = q_of()
    out = torch.full_like(q, 7.0)
    lse = torch.full(q.shape[:2], 7.0)
    with pytest.raises(ConfigError, match="scale"):
        multi_segment_attention(q, [seg(4)], scale=-1.0, out=out, lse=lse)
    with pytest.raises(ShapeError, match="out must be"):
        multi_segment_attention(q, [seg(4)], out=out.half(), lse=lse)
    with pytest.raises(ShapeError, match="lse must be float32"):
        multi_segment_attention(q, [seg(4)], out=out, lse=lse[:, :4])
    with pytest.raises(ShapeError, match="3 queries"):
        multi_segment_attention(q_of(tq=3), [seg(2)], out=torch.full((3, 8, 64), 7.0))
    assert torch.all(out == 7.0) and torch.all(lse == 7.0)


def test_out_buffers_are_written_in_place():
    q = q_of()
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"))
    got_out, got_lse = multi_segment_attention(q, [seg(5)], out=out, lse=lse)
    assert got_out.data_ptr() == out.data_ptr() and got_lse.data_ptr() == lse.data_ptr()
    assert not out.isnan().any() and not lse.isnan().any()


# ------------------------------------------------------------------------------ BlockSegments
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(runs=[[0, 1]], last=[0]), ConfigError, r"last_block_tokens \[0\] outside \[1, block_size=4\]"),
        (dict(runs=[[0, 1]], last=[5]), ConfigError, r"\[5\] outside"),
        (dict(runs=[[0], []], last=[4, 1]), ConfigError, "rise strictly"),
        (dict(runs=[], last=[]), ConfigError, "at least 2 entries"),
        (dict(runs=[[0], [1]], last=[4]), ConfigError, "1 last_block_tokens for 2 segments"),
        (dict(runs=[[0, -3]], last=[2]), OutOfRangeError, r"negative slot ids \[-3\]"),
        (dict(runs=[[0]], last=[2], block_size=0), ConfigError, "block_size"),
    ],
)
def test_block_segments_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        BlockSegments.from_runs(kwargs["runs"], kwargs["last"], block_size=kwargs.get("block_size", 4))


def test_block_segments_layout():
    segs = BlockSegments.from_runs([[5, 2, 9], [0], [3, 4]], [3, 1, 4], block_size=4)
    assert segs.slots.tolist() == [5, 2, 9, 0, 3, 4]
    assert segs.block_start.tolist() == [0, 4, 8, 11, 12, 16, 20]
    assert (segs.num_tokens, segs.last_start, segs.last_tokens, segs.max_slot) == (20, 12, 8, 9)
    slot, offset = segs.token_slots()
    assert slot.tolist() == [5] * 4 + [2] * 4 + [9] * 3 + [0] + [3] * 4 + [4] * 4
    assert offset.tolist() == [0, 1, 2, 3] * 2 + [0, 1, 2] + [0] + [0, 1, 2, 3] * 2
    with pytest.raises(ShapeError, match="int32"):
        BlockSegments(slots=segs.slots.long(), block_start=segs.block_start, block_size=4, num_tokens=20,
                      last_start=12, max_slot=9)  # fmt: skip


def cache(num_slots=6, bs=4, hkv=2, d=64, dtype=torch.float32):
    kv = torch.randn(num_slots, 2, 2, bs, hkv, d).to(dtype)
    return kv[:, 1, 0], kv[:, 1, 1]


def test_paged_errors():
    k, v = cache()
    q = q_of()
    segs = BlockSegments.from_runs([[0, 1]], [3], block_size=4)
    with pytest.raises(OutOfRangeError, match="slot 6, the cache has 6 slots"):
        paged_attention(q, k, v, BlockSegments.from_runs([[6]], [1], block_size=4))
    with pytest.raises(ShapeError, match="block_size=8 but the cache's block size is 4"):
        paged_attention(q, k, v, BlockSegments.from_runs([[0]], [1], block_size=8))
    with pytest.raises(ShapeError, match="k_cache .* and v_cache .* differ"):
        paged_attention(q, k, v[:5], segs)
    with pytest.raises(ShapeError, match="v_cache.dtype"):
        paged_attention(q, k, v.half(), segs)
    with pytest.raises(ShapeError, match=r"\[num_slots, block_size, Hkv, D\]"):
        paged_attention(q, k[0], v, segs)
    with pytest.raises(ShapeError, match="Hq=8 must be a multiple of KV heads Hkv=3"):
        paged_attention(q, *cache(hkv=3), segs)
    with pytest.raises(ShapeError, match="8 queries .* only 7 tokens"):
        paged_attention(q_of(tq=8), k, v, segs)
    with pytest.raises(ShapeError, match="must be BlockSegments"):
        paged_attention(q, k, v, [[0, 1]])


def test_token_set_errors():
    k, v = cache(num_slots=6, bs=4, hkv=2)
    q = q_of()
    table = torch.tensor([3, 1, -1], dtype=torch.int32)
    pos = torch.tensor([[0, 5], [1, 7]], dtype=torch.int32)
    out = torch.full_like(q, 7.0)
    paged_token_attention(q, k, v, table, pos)  # valid: the -1 entry is never referenced
    with pytest.raises(ShapeError, match="positions must be an int32"):
        paged_token_attention(q, k, v, table, pos.long())
    with pytest.raises(ShapeError, match="block_table must be an int32"):
        paged_token_attention(q, k, v, table.long(), pos)
    with pytest.raises(ShapeError, match=r"positions must be \[Hkv=2, K\]"):
        paged_token_attention(q, k, v, table, pos[:1])
    with pytest.raises(OutOfRangeError, match=r"positions \[12\] outside \[0, 12\)"):
        paged_token_attention(q, k, v, table, torch.tensor([[0, 12], [1, 2]], dtype=torch.int32), out=out)
    with pytest.raises(OutOfRangeError, match=r"positions \[7\] outside \[0, 6\)"):
        paged_token_attention(q, k, v, table, pos, seq_len=6, out=out)
    with pytest.raises(OutOfRangeError, match=r"slots \[-1\] outside \[0, 6\)"):
        paged_token_attention(q, k, v, table, torch.tensor([[0, 9], [1, 2]], dtype=torch.int32), out=out)
    with pytest.raises(ShapeError, match=r"seq_len=13 must be an int in \[Tq=1, block_table capacity=12\]"):
        paged_token_attention(q, k, v, table, pos, seq_len=13)
    assert torch.all(out == 7.0)


def test_merge_states_errors():
    outs = torch.randn(2, 3, 4, 64)
    lses = torch.randn(2, 3, 4)
    with pytest.raises(ShapeError, match=r"\[Tq, S, Hq, D\]"):
        merge_states(outs[0], lses)
    with pytest.raises(ShapeError, match="lses must be float32"):
        merge_states(outs, lses.double())
    with pytest.raises(ShapeError, match=r"lses must be float32 \(2, 3, 4\)"):
        merge_states(outs, lses[:, :2])


# ------------------------------------------------------------------------------ backends
def test_backend_resolution(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend(None, CPU) == "torch"  # kernel off by default until validated on a GPU
    assert resolve_backend("auto", CPU) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "auto")
    assert resolve_backend(None, CPU) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "fast")
    with pytest.raises(ConfigError, match=r"\$KVSTORE_ATTN_BACKEND='fast' is not one of"):
        resolve_backend(None, CPU)
    with pytest.raises(ConfigError, match="backend='triton'"):
        multi_segment_attention(q_of(), [seg(3)], backend="triton")
    with pytest.raises(ShapeError, match="backend 'cuda' needs CUDA tensors"):
        multi_segment_attention(q_of(), [seg(3)], backend="cuda")


def test_forced_cuda_without_cupy(monkeypatch):
    from kvstore import kernels

    monkeypatch.setattr(kernels, "cupy_available", lambda: False)
    with pytest.raises(KernelError, match="need cupy"):
        kernels.load_kernel("multi_segment_attention.cu", "msa_merge<float, float>")
    with pytest.raises(KernelError, match="needs cupy"):
        resolve_backend("cuda", torch.device("cuda", 0))


def test_unknown_source_is_a_kernel_error(monkeypatch):
    from kvstore import kernels

    if not kernels.cupy_available():
        pytest.skip("cupy is not installed")
    with pytest.raises(KernelError, match="no_such.cu"):
        kernels.load_kernel("no_such.cu", "f", device=0)


def test_numpy_slot_arrays_are_accepted():
    segs = BlockSegments.build(np.array([4, 1, 2]), np.array([0, 2, 3]), np.array([4, 2]), block_size=4)
    assert segs.num_tokens == 10 and segs.last_start == 8
