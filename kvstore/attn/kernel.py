"""Thin wrapper of csrc/multi_segment_attention.cu: checks strides and devices, plans, launches.

Inputs arrive validated by :mod:`kvstore.attn.api` (shapes, dtypes, index ranges); this layer
adds what only the kernel needs and never casts:

* every tensor on one CUDA device; the last dim of q, K, V contiguous and every row 16-byte
  aligned (base pointer and strides), since the kernel reads 16-byte vectors;
* index tensors int32 with a contiguous last dim.

Plan: the keys are cut into chunks of ``chunk`` work items so that about ``_CTAS_PER_SM`` CTAs
per SM run (chunks x KV heads x row tiles), at least ``_MIN_CHUNK`` keys each. One chunk writes
the output directly; more chunks write float32 partial states ``[chunks, Tq, Hq, D]`` that
one ``msa_merge`` launch combines (split-K). Outputs may be passed in (``out``, ``lse``) and are
written in place.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from kvstore import kernels
from kvstore.attn.segments import BlockSegments
from kvstore.errors import ShapeError

__all__ = ["merge_states", "multi_segment_attention", "paged_attention", "paged_token_attention"]

_SOURCE = "multi_segment_attention.cu"
_CTYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
_THREADS = 256  # msa::kThreads
_BLOCKS, _TOKENS = 0, 1  # msa::kBlocks, msa::kTokens
_NO_CAUSAL = 2**31 - 1  # causal_start that turns the mask off
_CTAS_PER_SM = 4
_MIN_CHUNK = 64
_MAX_STAGED_BLOCKS = 2048  # block-list chunks stage <= this many (slot, start, count) triples: 24 KiB


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _check_device(device: torch.device, **tensors: torch.Tensor | None) -> None:
    if device.type != "cuda":
        raise ShapeError(f"the CUDA kernel needs CUDA tensors, got q on {device}")
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ShapeError(f"{name} is on {t.device}, q on {device}")


def _check_rows(name: str, t: torch.Tensor) -> None:
    """Last dim contiguous; base pointer and every stride that matters a multiple of 16 bytes."""
    if t.stride(-1) != 1:
        raise ShapeError(f"{name} needs a contiguous last dim, got strides {t.stride()}")
    size = t.element_size()
    strides = [s for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1]
    if t.data_ptr() % 16 or any(s * size % 16 for s in strides):
        raise ShapeError(
            f"{name} rows must be 16-byte aligned for the kernel: data_ptr % 16 = {t.data_ptr() % 16}, "
            f"strides {t.stride()} x {size} bytes"
        )


def _check_index(name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.int32:
        raise ShapeError(f"{name} must be int32, got {t.dtype}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ShapeError(f"{name} needs a contiguous last dim, got strides {t.stride()}")


def _outputs(q: torch.Tensor, out: torch.Tensor | None, lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape[-1] > 1 and out.stride(-1) != 1:
        raise ShapeError(f"out needs a contiguous last dim, got strides {out.stride()}")
    if lse is None:
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    elif not lse.is_contiguous():
        raise ShapeError(f"lse must be contiguous for the kernel, got strides {lse.stride()}")
    return out, lse


def _rows_per_cta(num_rows: int) -> int:
    """ROWS of the msa_partial instantiation: the next power of two, at most 8."""
    return min(8, 1 << max(0, num_rows - 1).bit_length())


def _chunk_items(
    num_items: int, num_kv_heads: int, row_tiles: int, device_index: int, staged_block_size: int | None
) -> int:
    """Work items per CTA: about _CTAS_PER_SM CTAs per SM, a multiple of _MIN_CHUNK, and for a
    block list (``staged_block_size`` given) few enough blocks to stage in shared memory."""
    want = max(1, -(-_CTAS_PER_SM * _sm_count(device_index) // (num_kv_heads * row_tiles)))
    chunk = -(-max(_MIN_CHUNK, -(-num_items // want)) // _MIN_CHUNK) * _MIN_CHUNK
    if staged_block_size is not None:
        chunk = min(chunk, max(_MIN_CHUNK, (_MAX_STAGED_BLOCKS - 2) * staged_block_size // _MIN_CHUNK * _MIN_CHUNK))
    return chunk


class _Launch:
    """One attention call: the query side, the outputs and the partial-state buffers."""

    def __init__(
        self, q: torch.Tensor, num_kv_heads: int, total_items: int, scale: float | None, out, lse, *,
        staged_block_size: int | None = None,
    ) -> None:
        self.q = q
        self.num_kv_heads = num_kv_heads
        self.group = q.shape[1] // num_kv_heads
        self.rows = _rows_per_cta(q.shape[0] * self.group)
        self.row_tiles = -(-q.shape[0] * self.group // self.rows)
        self.device_index = q.device.index if q.device.index is not None else torch.cuda.current_device()
        self.chunk = _chunk_items(total_items, num_kv_heads, self.row_tiles, self.device_index, staged_block_size)
        self.scale = q.shape[-1] ** -0.5 if scale is None else scale
        self.out, self.lse = _outputs(q, out, lse)
        self.part_out: torch.Tensor | None = None
        self.part_lse: torch.Tensor | None = None
        self.parts_done = 0

    def chunks(self, num_items: int) -> int:
        return -(-num_items // self.chunk)

    def allocate_parts(self, num_parts: int) -> None:
        """Partial-state buffers for ``num_parts`` chunks in all (none when one chunk suffices)."""
        if num_parts > 1:
            tq, hq, d = self.q.shape
            self.part_out = torch.empty((num_parts, tq, hq, d), dtype=torch.float32, device=self.q.device)
            self.part_lse = torch.empty((num_parts, tq, hq), dtype=torch.float32, device=self.q.device)

    def partial(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_strides: Sequence[int],
        v_strides: Sequence[int],
        *,
        mode: int,
        num_slots: int,
        block_size: int,
        slots: torch.Tensor | None,
        block_start: torch.Tensor | None,
        positions: torch.Tensor | None,
        num_blocks: int,
        num_items: int,
        causal_start: int,
        causal_end: int,
    ) -> None:
        """Launch msa_partial over ``num_items`` work items (strides are (slot, token, head), in elements)."""
        q = self.q
        tq, hq, d = q.shape
        num_chunks = self.chunks(num_items)
        name = f"msa_partial<{_CTYPES[q.dtype]}, {d}, {self.rows}, {mode}>"
        kernel = kernels.load_kernel(_SOURCE, name, device=self.device_index)
        args = (
            kernels.ptr(q), kernels.i64(q.stride(0)), kernels.i64(q.stride(1)),
            kernels.ptr(k), *map(kernels.i64, k_strides),
            kernels.ptr(v), *map(kernels.i64, v_strides),
            kernels.i32(num_slots), kernels.i32(block_size), kernels.ptr(slots), kernels.ptr(block_start),
            kernels.ptr(positions), kernels.i64(positions.stride(0) if positions is not None else 0),
            kernels.i32(num_blocks), kernels.i32(num_items), kernels.i32(self.chunk),
            kernels.i32(tq), kernels.i32(hq), kernels.i32(self.group), kernels.i32(causal_start), kernels.i32(causal_end),
            kernels.f32(self.scale),
            kernels.ptr(self.out), kernels.i64(self.out.stride(0)), kernels.i64(self.out.stride(1)), kernels.ptr(self.lse),
            kernels.ptr(self.part_out), kernels.ptr(self.part_lse), kernels.i32(self.parts_done),
            kernels.i32(int(self.part_out is None)),
        )  # fmt: skip
        grid = (num_chunks, self.num_kv_heads, self.row_tiles)
        staged = 12 * (self.chunk // block_size + 2) if mode == _BLOCKS and slots is not None else 0
        kernels.launch(kernel, grid, (_THREADS,), args, device=self.device_index, shared_mem=staged)
        self.parts_done += num_chunks

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.part_out is not None:
            assert self.parts_done == self.part_out.shape[0], "every partial state written once"
            p, pl = self.part_out, self.part_lse
            _merge(p, p.stride()[:3], pl, pl.stride(), p.shape[0], self.out, self.lse)
        return self.out, self.lse


def _merge(
    parts: torch.Tensor,
    part_strides: Sequence[int],
    part_lse: torch.Tensor,
    lse_strides: Sequence[int],
    num_parts: int,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    """msa_merge of ``num_parts`` states; strides are (part, token, head) in elements, out ``[Tq, Hq, D]``."""
    tq, hq, d = out.shape
    if tq * hq == 0:
        return
    index = out.device.index if out.device.index is not None else torch.cuda.current_device()
    kernel = kernels.load_kernel(_SOURCE, f"msa_merge<{_CTYPES[parts.dtype]}, {_CTYPES[out.dtype]}>", device=index)
    args = (
        kernels.ptr(parts), *map(kernels.i64, part_strides), kernels.ptr(part_lse), *map(kernels.i64, lse_strides),
        kernels.i32(num_parts), kernels.i32(hq), kernels.i32(d), kernels.ptr(out), kernels.i64(out.stride(0)),
        kernels.i64(out.stride(1)), kernels.ptr(lse),
    )  # fmt: skip
    kernels.launch(kernel, (tq * hq,), (min(256, -(-d // 32) * 32),), args, device=index)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    segments: BlockSegments,
    *,
    causal_last: bool = True,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel for :func:`kvstore.attn.paged_attention` (same arguments, validated)."""
    _check_device(q.device, k_cache=k_cache, v_cache=v_cache, slots=segments.slots, out=out, lse=lse)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_rows(name, t)
    num_slots, block_size, num_kv_heads, _ = k_cache.shape
    num_items = segments.num_blocks * block_size
    call = _Launch(q, num_kv_heads, num_items, scale, out, lse, staged_block_size=block_size)
    call.allocate_parts(call.chunks(num_items))
    call.partial(
        k_cache, v_cache, k_cache.stride()[:3], v_cache.stride()[:3], mode=_BLOCKS, num_slots=num_slots,
        block_size=block_size, slots=segments.slots, block_start=segments.block_start, positions=None,
        num_blocks=segments.num_blocks, num_items=num_items,
        causal_start=segments.last_start if causal_last else _NO_CAUSAL, causal_end=segments.num_tokens,
    )  # fmt: skip
    return call.finish()


def paged_token_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    positions: torch.Tensor,
    *,
    seq_len: int | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel for :func:`kvstore.attn.paged_token_attention` (same arguments, validated)."""
    _check_device(q.device, k_cache=k_cache, v_cache=v_cache, block_table=block_table, positions=positions,
                  out=out, lse=lse)  # fmt: skip
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_rows(name, t)
    _check_index("block_table", block_table)
    _check_index("positions", positions)
    num_slots, block_size, num_kv_heads, _ = k_cache.shape
    num_items = positions.shape[1]
    call = _Launch(q, num_kv_heads, max(1, num_items), scale, out, lse)
    if num_items == 0:
        call.out.zero_()
        call.lse.fill_(float("-inf"))
        return call.out, call.lse
    call.allocate_parts(call.chunks(num_items))
    call.partial(
        k_cache, v_cache, k_cache.stride()[:3], v_cache.stride()[:3], mode=_TOKENS, num_slots=num_slots,
        block_size=block_size, slots=block_table, block_start=None, positions=positions,
        num_blocks=block_table.shape[0], num_items=num_items,
        causal_start=_NO_CAUSAL if seq_len is None else 0, causal_end=0 if seq_len is None else seq_len,
    )  # fmt: skip
    return call.finish()


def multi_segment_attention(
    q: torch.Tensor,
    segments: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    causal_last: bool = True,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel for :func:`kvstore.attn.multi_segment_attention` (same arguments, validated).

    Each segment ``[Tk, Hkv, D]`` is read in place as a one-block cache; one msa_partial launch
    per non-empty segment writes into a shared partial-state buffer, one msa_merge combines.
    """
    _check_device(q.device, out=out, lse=lse)
    _check_rows("q", q)
    for index, (k, v) in enumerate(segments):
        _check_device(q.device, **{f"segments[{index}].k": k, f"segments[{index}].v": v})
        if k.shape[0]:
            _check_rows(f"segments[{index}].k", k)
            _check_rows(f"segments[{index}].v", v)
    num_kv_heads = segments[0][0].shape[1] if segments else 1
    total = sum(k.shape[0] for k, _ in segments)
    call = _Launch(q, num_kv_heads, max(1, total), scale, out, lse)
    if total == 0:
        call.out.zero_()
        call.lse.fill_(float("-inf"))
        return call.out, call.lse
    call.allocate_parts(sum(call.chunks(k.shape[0]) for k, _ in segments))
    last = len(segments) - 1
    for index, (k, v) in enumerate(segments):
        num_keys = k.shape[0]
        if num_keys == 0:
            continue
        call.partial(
            k, v, (0, k.stride(0), k.stride(1)), (0, v.stride(0), v.stride(1)), mode=_BLOCKS, num_slots=1,
            block_size=num_keys, slots=None, block_start=None, positions=None, num_blocks=1, num_items=num_keys,
            causal_start=0 if causal_last and index == last else _NO_CAUSAL, causal_end=num_keys,
        )  # fmt: skip
    return call.finish()


def merge_states(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel for :func:`kvstore.attn.merge_states` (validated): outs ``[Tq, S, Hq, D]``, lses ``[Tq, S, Hq]``."""
    _check_device(outs.device, lses=lses)
    if outs.shape[-1] > 1 and outs.stride(-1) != 1:
        raise ShapeError(f"outs needs a contiguous last dim, got strides {outs.stride()}")
    tq, num_parts, hq, d = outs.shape
    out = torch.empty((tq, hq, d), dtype=outs.dtype, device=outs.device)
    lse = torch.empty((tq, hq), dtype=torch.float32, device=outs.device)
    strides = (outs.stride(1), outs.stride(0), outs.stride(2))
    _merge(outs, strides, lses, (lses.stride(1), lses.stride(0), lses.stride(2)), num_parts, out, lse)
    return out, lse
