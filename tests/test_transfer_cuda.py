"""Host -> device copy paths: the pure-Python planning on any machine, bit-exact copies on a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.blocks import BlockPool
from kvstore.errors import ConfigError, OutOfRangeError, ShapeError
from kvstore.spec import KVSpec
from kvstore.transfer import (
    H2D_PATH_ENV,
    H2D_PATHS,
    UVA_MAX_RUN_BYTES,
    BlockMover,
    choose_h2d_path,
    gather_blocks,
    slot_runs,
)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PATHS = [*H2D_PATHS, "auto"]


# ----------------------------------------------------------------------------- CPU: planning
def test_slot_runs_example():
    starts, lengths = slot_runs(np.array([4, 5, 6, 9, 10, 2]), np.array([0, 1, 2, 3, 7, 8]))
    # (4,5,6)->(0,1,2) is a run; 9->3 and 10->7 break on dst; 2->8 breaks on src
    assert starts.tolist() == [0, 3, 4, 5]
    assert lengths.tolist() == [3, 1, 1, 1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), max_size=30))
def test_slot_runs_cover_every_slot_in_order(pairs):
    src = np.array([p[0] for p in pairs], dtype=np.int64)
    dst = np.array([p[1] for p in pairs], dtype=np.int64)
    starts, lengths = slot_runs(src, dst)
    assert lengths.sum() == src.size and np.all(lengths >= 1)
    rebuilt_src = np.concatenate([src[a] + np.arange(n) for a, n in zip(starts, lengths)] or [np.empty(0, np.int64)])
    rebuilt_dst = np.concatenate([dst[a] + np.arange(n) for a, n in zip(starts, lengths)] or [np.empty(0, np.int64)])
    assert np.array_equal(rebuilt_src, src) and np.array_equal(rebuilt_dst, dst)
    # maximal: two adjacent runs could not have been one
    for (a, n), b in zip(zip(starts[:-1], lengths[:-1]), starts[1:]):
        assert not (src[b] == src[a] + n and dst[b] == dst[a] + n)


def test_slot_runs_rejects_mismatched_lengths():
    with pytest.raises(ShapeError, match="3 source slots but 2"):
        slot_runs(np.arange(3), np.arange(2))


def test_choose_h2d_path():
    small = 64 * 1024
    assert choose_h2d_path(1, 100, small) == "memcpy"  # one run: one copy
    assert choose_h2d_path(100, 100, small) == "uva"  # scattered small blocks: one launch
    assert choose_h2d_path(100, 100, 2 * UVA_MAX_RUN_BYTES) == "memcpy"  # each copy amortised
    assert choose_h2d_path(10, 100, small, uva_max_run_bytes=10 * small - 1) == "memcpy"
    assert choose_h2d_path(10, 100, small, uva_max_run_bytes=10 * small) == "uva"


@pytest.mark.parametrize("args", [(0, 1, 16), (1, 0, 16), (2, 1, 16), (1, 1, 0), (1.5, 2, 16), (True, 2, 16)])
def test_choose_h2d_path_rejects_bad_input(args):
    with pytest.raises(ConfigError):
        choose_h2d_path(*args)


def test_block_mover_rejects_unknown_path(monkeypatch):
    with pytest.raises(ConfigError, match="h2d_path='dma'"):
        BlockMover("cpu", h2d_path="dma")
    monkeypatch.setenv(H2D_PATH_ENV, "bogus")
    with pytest.raises(ConfigError, match=r"\$KVSTORE_H2D_PATH='bogus'"):
        BlockMover("cpu")
    monkeypatch.setenv(H2D_PATH_ENV, "uva")
    assert BlockMover("cpu").h2d_path == "uva"


@pytest.mark.parametrize("path", PATHS)
def test_cpu_copy_is_unchanged_by_the_path(path):
    spec = KVSpec(num_layers=2, num_kv_heads=2, num_q_heads=4, head_dim=8, dtype=torch.float32, block_size=4)
    g = torch.Generator().manual_seed(3)
    src = BlockPool(spec, 12, name="host")
    dst = BlockPool(spec, 8, name="device")
    src.kv.copy_(torch.randn(src.kv.shape, generator=g))
    dst.kv.copy_(torch.randn(dst.kv.shape, generator=g))
    before = dst.kv.clone()
    s, d = np.array([7, 1, 2, 3, 11]), np.array([0, 5, 6, 7, 2])
    handle = BlockMover("cpu", h2d_path=path).copy(src, s, dst, d)
    assert handle.done() and handle.num_blocks == 5 and handle.path is None
    assert torch.equal(dst.kv[d], src.kv[s])
    untouched = np.setdiff1d(np.arange(8), d)
    assert torch.equal(dst.kv[untouched], before[untouched])


def _pools(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    src = torch.randn(10, 2, 4, 8, generator=g).to(dtype)
    dst = torch.zeros(6, 2, 4, 8, dtype=dtype)
    return src, dst


def test_gather_blocks_validates_before_launching():
    src, dst = _pools()
    with pytest.raises(ShapeError, match="3 source slots but 2"):
        gather_blocks(src, np.arange(3), dst, np.arange(2))
    with pytest.raises(ShapeError, match="no silent casts"):
        gather_blocks(src.half(), np.arange(2), dst, np.arange(2))
    with pytest.raises(OutOfRangeError, match=r"src slots \[10\]"):
        gather_blocks(src, np.array([0, 10]), dst, np.arange(2))
    with pytest.raises(OutOfRangeError, match=r"dst slots \[-1\]"):
        gather_blocks(src, np.arange(2), dst, np.array([-1, 0]))
    with pytest.raises(ShapeError, match="listed twice"):
        gather_blocks(src, np.arange(2), dst, np.array([1, 1]))
    with pytest.raises(ShapeError, match="dst must be a CUDA pool"):
        gather_blocks(src, np.arange(2), dst, np.arange(2))
    assert torch.count_nonzero(dst) == 0  # nothing written


# ----------------------------------------------------------------------------- GPU: bit-exact
def _spec(dtype):
    return KVSpec(num_layers=3, num_kv_heads=2, num_q_heads=4, head_dim=64, dtype=dtype, block_size=16)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("path", PATHS)
def test_host_to_device_paths_are_bit_exact(path, dtype):
    spec = _spec(dtype)
    host = BlockPool(spec, 64, device="cpu", pin_memory=True, name="host")
    dev = BlockPool(spec, 32, device="cuda", name="device")
    g = torch.Generator().manual_seed(7)
    host.kv.copy_(torch.randn(host.kv.shape, generator=g).to(dtype))
    dev.kv.copy_(torch.randn(dev.kv.shape, generator=g).to(dtype).cuda())
    before = dev.kv.clone()
    rng = np.random.default_rng(0)
    src = np.concatenate([rng.choice(np.arange(40), 12, replace=False), np.arange(50, 58)])  # scattered + a run
    dst = np.concatenate([rng.choice(np.arange(24), 12, replace=False), np.arange(24, 32)])
    mover = BlockMover("cuda", h2d_path=path)
    handle = mover.copy(host, src, dev, dst)
    handle.synchronize()
    assert handle.path == path if path != "auto" else handle.path in ("memcpy", "uva")
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(dev.kv[torch.from_numpy(dst).cuda()].view(bits).cpu(), host.kv[src].view(bits))
    untouched = torch.from_numpy(np.setdiff1d(np.arange(32), dst)).cuda()
    assert torch.equal(dev.kv[untouched].view(bits), before[untouched].view(bits))


@requires_cuda
def test_gather_blocks_device_to_device_and_single_block():
    g = torch.Generator().manual_seed(5)
    src = torch.randn(20, 3, 16, 2, 64, generator=g).cuda()
    dst = torch.zeros(9, 3, 16, 2, 64, device="cuda")
    gather_blocks(src, np.array([19, 0, 7]), dst, np.array([8, 3, 0]))
    gather_blocks(src, np.array([4]), dst, np.array([5]))
    torch.cuda.synchronize()
    assert torch.equal(dst[[8, 3, 0, 5]], src[[19, 0, 7, 4]])
    assert torch.count_nonzero(dst[[1, 2, 4, 6, 7]]) == 0


@requires_cuda
def test_gather_blocks_refuses_pageable_host_memory():
    src = torch.randn(4, 16, 64)
    dst = torch.zeros(4, 16, 64, device="cuda")
    with pytest.raises(ShapeError, match="must be pinned"):
        gather_blocks(src, np.arange(2), dst, np.arange(2))
