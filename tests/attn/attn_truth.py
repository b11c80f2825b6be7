"""Float64 ground truth for the attention tests, written independently of kvstore.attn.

Keys are collected and masks are built with plain Python loops over tokens (small sizes
only), so a mistake in the library's vectorised gathers or masks cannot hide in the truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvstore.blocks import BlockPool
from kvstore.spec import KVSpec

LAYER = 1  # tests read layer 1 of a 2-layer pool, so every view is strided


def truth_attention(
    q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], visible: list[list[list[bool]]], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 attention, one query head at a time.

    Args:
        q: ``[Tq, Hq, D]``.
        keys, values: per KV head, ``[T_h, D]``.
        visible: per KV head, ``visible[h][i][j]``: query i sees key j.

    Returns:
        ``out [Tq, Hq, D]``, ``lse [Tq, Hq]`` in float64 on the CPU.
    """
    q = q.detach().double().cpu()
    num_q, num_heads, dim = q.shape
    group = num_heads // len(keys)
    out = torch.zeros(num_q, num_heads, dim, dtype=torch.float64)
    lse = torch.full((num_q, num_heads), float("-inf"), dtype=torch.float64)
    for h in range(num_heads):
        kv = h // group
        k = keys[kv].detach().double().cpu()
        v = values[kv].detach().double().cpu()
        if k.shape[0] == 0:
            continue
        scores = (q[:, h] @ k.T) * scale
        mask = torch.tensor(visible[kv], dtype=torch.bool).reshape(num_q, k.shape[0])
        scores[~mask] = float("-inf")
        row_lse = torch.logsumexp(scores, dim=-1)
        for i in range(num_q):
            if torch.isfinite(row_lse[i]):
                out[i, h] = torch.softmax(scores[i], dim=-1) @ v
        lse[:, h] = row_lse
    return out, lse


def segments_truth(q, segments, *, causal_last: bool, scale: float):
    """Truth for a list of (k [Tk, Hkv, D], v) segments."""
    num_q = q.shape[0]
    num_kv = segments[0][0].shape[1]
    keys = [torch.cat([k[:, h] for k, _ in segments]) for h in range(num_kv)]
    values = [torch.cat([v[:, h] for _, v in segments]) for h in range(num_kv)]
    flags = []  # per key: (in the last segment, index inside it)
    for s, (k, _) in enumerate(segments):
        flags += [(s == len(segments) - 1, j) for j in range(k.shape[0])]
    last_len = segments[-1][0].shape[0]
    row = [
        [not (causal_last and last) or j <= last_len - num_q + i for last, j in flags] for i in range(num_q)
    ]
    return truth_attention(q, keys, values, [row] * num_kv, scale)


def make_pool(*, num_slots: int, block_size: int, num_kv_heads: int, head_dim: int, dtype, device, gen) -> BlockPool:
    spec = KVSpec(num_layers=2, num_kv_heads=num_kv_heads, num_q_heads=num_kv_heads, head_dim=head_dim,
                  dtype=dtype, block_size=block_size)  # fmt: skip
    pool = BlockPool(spec, num_slots, device=device)
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=gen).to(dtype))
    return pool


@dataclass(frozen=True)
class PagedCase:
    block_size: int
    run_blocks: tuple[int, ...]
    last_block_tokens: tuple[int, ...]
    num_q: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool

    def __str__(self) -> str:
        return (f"bs{self.block_size}-runs{'_'.join(map(str, self.run_blocks))}-last"
                f"{'_'.join(map(str, self.last_block_tokens))}-q{self.num_q}-h{self.num_heads}x{self.num_kv_heads}"
                f"-d{self.head_dim}-{'causal' if self.causal else 'full'}")  # fmt: skip


def paged_inputs(case: PagedCase, dtype, device, seed: int = 0):
    """A pool with scattered slots, the runs, a query and the float64 truth for them."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(case.run_blocks)
    pool = make_pool(num_slots=2 * num_blocks + 3, block_size=case.block_size, num_kv_heads=case.num_kv_heads,
                     head_dim=case.head_dim, dtype=dtype, device=device, gen=gen)  # fmt: skip
    order = np.random.default_rng(seed).permutation(pool.num_slots)[:num_blocks]
    runs, start = [], 0
    for n in case.run_blocks:
        runs.append(order[start : start + n].tolist())
        start += n
    q = (1.5 * torch.randn(case.num_q, case.num_heads, case.head_dim, generator=gen)).to(dtype).to(device)
    kv = pool.kv.cpu()
    tokens = []  # (slot, offset, in the last segment, index inside it)
    for s, (run, last) in enumerate(zip(runs, case.last_block_tokens)):
        index = 0
        for b, slot in enumerate(run):
            for o in range(last if b == len(run) - 1 else case.block_size):
                tokens.append((slot, o, s == len(runs) - 1, index))
                index += 1
    last_len = sum(1 for t in tokens if t[2])
    keys = [torch.stack([kv[slot, LAYER, 0, o, h] for slot, o, _, _ in tokens]) for h in range(case.num_kv_heads)]
    values = [torch.stack([kv[slot, LAYER, 1, o, h] for slot, o, _, _ in tokens]) for h in range(case.num_kv_heads)]
    row = [[not (case.causal and last) or j <= last_len - case.num_q + i for _, _, last, j in tokens]
           for i in range(case.num_q)]  # fmt: skip
    truth = truth_attention(q, keys, values, [row] * case.num_kv_heads, case.head_dim**-0.5)
    return pool, runs, q, truth


@dataclass(frozen=True)
class TokenCase:
    block_size: int
    num_blocks: int
    num_selected: int
    num_q: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    seq_len: int | None

    def __str__(self) -> str:
        return (f"bs{self.block_size}-nb{self.num_blocks}-k{self.num_selected}-q{self.num_q}-h{self.num_heads}x"
                f"{self.num_kv_heads}-d{self.head_dim}-seq{self.seq_len}")  # fmt: skip


def token_inputs(case: TokenCase, dtype, device, seed: int = 0):
    """A pool, a block table (unreferenced blocks -1), per-head sorted positions, q and the truth."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    pool = make_pool(num_slots=case.num_blocks + 5, block_size=case.block_size, num_kv_heads=case.num_kv_heads,
                     head_dim=case.head_dim, dtype=dtype, device=device, gen=gen)  # fmt: skip
    table = rng.permutation(pool.num_slots)[: case.num_blocks].astype(np.int32)
    limit = case.seq_len if case.seq_len is not None else case.num_blocks * case.block_size
    positions = np.stack([
        np.sort(np.concatenate([[limit - 1], rng.choice(limit - 1, case.num_selected - 1, replace=False)]))
        for _ in range(case.num_kv_heads)
    ]).astype(np.int32) if case.num_selected else np.zeros((case.num_kv_heads, 0), np.int32)  # fmt: skip
    used = np.unique(positions // case.block_size)
    table_masked = np.full_like(table, -1)
    table_masked[used] = table[used]
    q = (1.5 * torch.randn(case.num_q, case.num_heads, case.head_dim, generator=gen)).to(dtype).to(device)
    kv = pool.kv.cpu()
    keys, values, visible = [], [], []
    for h in range(case.num_kv_heads):
        addr = [(int(table[p // case.block_size]), int(p % case.block_size)) for p in positions[h]]
        keys.append(torch.stack([kv[s, LAYER, 0, o, h] for s, o in addr]) if addr else torch.zeros(0, case.head_dim))
        values.append(torch.stack([kv[s, LAYER, 1, o, h] for s, o in addr]) if addr else torch.zeros(0, case.head_dim))
        visible.append([[case.seq_len is None or int(p) <= case.seq_len - case.num_q + i for p in positions[h]]
                        for i in range(case.num_q)])  # fmt: skip
    truth = truth_attention(q, keys, values, visible, case.head_dim**-0.5)
    block_table = torch.from_numpy(table_masked).to(device)
    return pool, block_table, torch.from_numpy(positions).to(device), q, truth


def check_against_truth(out, lse, truth, dtype, *, baseline_err: float = 0.0) -> float:
    """Assert out/lse match the float64 truth; returns the output's max abs error.

    fp32: relative error (max abs error / max abs truth) <= 1e-5 for out and lse.
    fp16/bf16: out's max abs error <= 2x the larger of the truth's own rounding error in that
    dtype and ``baseline_err`` (the reference's error on the same inputs); lse (float32,
    accumulated in fp32 from exact low-precision inputs) still within 1e-5 relative.
    """
    truth_out, truth_lse = truth
    out = out.detach().double().cpu()
    lse = lse.detach().double().cpu()
    assert not torch.isnan(out).any(), "output has NaN (unwritten or poisoned entries)"
    assert not torch.isnan(lse).any(), "lse has NaN (unwritten or poisoned entries)"
    assert torch.equal(torch.isneginf(lse), torch.isneginf(truth_lse)), "rows seeing nothing differ"
    finite = torch.isfinite(truth_lse)
    scale = max(truth_lse[finite].abs().max().item(), 1.0) if finite.any() else 1.0
    lse_err = (lse[finite] - truth_lse[finite]).abs().max().item() if finite.any() else 0.0
    assert lse_err <= 1e-5 * scale, f"lse error {lse_err:.3g} > 1e-5 x {scale:.3g}"
    err = (out - truth_out).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-5 * max(truth_out.abs().max().item(), 1e-30), f"fp32 out rel error {err:.3g}"
    else:
        rounding = (truth_out.to(dtype).double() - truth_out).abs().max().item()
        bound = 2 * max(rounding, baseline_err)
        assert err <= bound, f"{dtype} out error {err:.3g} > 2 x max(rounding {rounding:.3g}, ref {baseline_err:.3g})"
    return err


def rand(shape, dtype, device, gen, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(shape, generator=gen)).to(dtype).to(device)
