"""Request traces for the replay simulator: the :class:`Trace` arrays and the JSONL loaders.

A trace is a sequence of requests; each request reads the KV blocks of its prompt, in prompt
order. Two line formats are understood (one JSON object per line, blank lines skipped):

``mooncake`` (the Mooncake FAST'25 release; every field required)::

    {"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": [0, 1, 2]}

    hash_ids: one id per ``block_tokens``-token block of the prompt (512 in Mooncake), so
    len(hash_ids) == ceil(input_length / block_tokens); equal ids are the same prefix KV.

``jsonl`` (generic; only ``blocks`` is required)::

    {"blocks": [17, 4, 99], "timestamp": 1.5, "input_length": 40, "output_length": 8}

    blocks: block ids (non-negative ints < 2**63) of the prompt in order, ``block_tokens``
        tokens each (the last may be partial when ``input_length`` says so);
    timestamp: arrival time in ms (default: the line's request index);
    input_length: prompt tokens (default ``len(blocks) * block_tokens``);
    output_length: generated tokens (default 0).

In both formats block ``i`` of a request starts at token ``i * block_tokens``, so a block id
must sit at the same index in every request that reads it, and at most once per request
(ids name prefix blocks). Anything else raises :class:`~kvstore.errors.TraceFormatError`
naming the file and the line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from kvstore import validate
from kvstore.errors import ConfigError, TraceFormatError

__all__ = ["Trace", "load_trace", "load_mooncake", "load_jsonl", "TRACE_FORMATS", "DEFAULT_BLOCK_TOKENS"]


@dataclass(frozen=True, kw_only=True, eq=False)
class Trace:
    """A request trace as flat arrays: request ``r`` reads ``blocks[offsets[r]:offsets[r+1]]``.

    Block ids are remapped to dense indices ``0 .. num_unique_blocks-1`` (the order of first
    appearance), so per-block state can live in arrays; ``block_ids`` maps them back.

    Attributes:
        offsets: ``[num_requests + 1]`` int64, CSR offsets into ``blocks``.
        blocks: ``[num_block_requests]`` int64 dense block index of every block read, in order.
        block_ids: ``[num_unique_blocks]`` int64 the trace's original id of each dense index.
        position: ``[num_unique_blocks]`` int64 first token position of each block.
        num_tokens: ``[num_unique_blocks]`` int32 tokens each block holds (<= block_tokens).
        first_read: ``[num_unique_blocks]`` int64 index into ``blocks`` of each block's first read.
        first_request: ``[num_unique_blocks]`` int64 the request that first reads each block.
        timestamp: ``[num_requests]`` float64 arrival times (ms).
        input_length: ``[num_requests]`` int64 prompt tokens.
        output_length: ``[num_requests]`` int64 generated tokens.
        block_tokens: tokens per full block.
        source: where the trace came from (a path or a description).
    """

    offsets: np.ndarray
    blocks: np.ndarray
    block_ids: np.ndarray
    position: np.ndarray
    num_tokens: np.ndarray
    first_read: np.ndarray
    first_request: np.ndarray
    timestamp: np.ndarray
    input_length: np.ndarray
    output_length: np.ndarray
    block_tokens: int
    source: str = "<memory>"

    @property
    def num_requests(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def num_block_requests(self) -> int:
        return int(self.blocks.shape[0])

    @property
    def num_unique_blocks(self) -> int:
        return int(self.block_ids.shape[0])

    @property
    def max_request_blocks(self) -> int:
        """Blocks of the longest request (0 for an empty trace)."""
        return int(np.diff(self.offsets).max(initial=0))

    def request(self, r: int) -> np.ndarray:
        """Dense block indices read by request ``r``: ``[len]`` int64."""
        return self.blocks[self.offsets[r] : self.offsets[r + 1]]

    def request_of_block_request(self) -> np.ndarray:
        """``[num_block_requests]`` int64: the request each entry of ``blocks`` belongs to."""
        return np.repeat(np.arange(self.num_requests, dtype=np.int64), np.diff(self.offsets))

    def is_first_read(self) -> np.ndarray:
        """``[num_block_requests]`` bool: the read is its block's first (a compulsory miss)."""
        mask = np.zeros(self.num_block_requests, dtype=bool)
        mask[self.first_read] = True
        return mask

    def next_use(self) -> np.ndarray:
        """``[num_block_requests]`` int64: index into ``blocks`` of the next read of the same
        block, or ``num_block_requests`` when it is never read again (what offline policies need)."""
        n = self.num_block_requests
        order = np.lexsort((np.arange(n), self.blocks))  # by block, then by time
        nxt = np.full(n, n, dtype=np.int64)
        same = self.blocks[order[1:]] == self.blocks[order[:-1]]
        nxt[order[:-1][same]] = order[1:][same]
        return nxt

    @classmethod
    def from_requests(
        cls,
        requests: Sequence[Sequence[int]],
        *,
        block_tokens: int = 16,
        input_lengths: Sequence[int] | None = None,
        source: str = "<memory>",
    ) -> "Trace":
        """A trace from in-memory block-id lists (the ``jsonl`` rules apply; errors name the
        request index as the line). Ids and lengths are integers (numpy integers too; floats and
        bools are refused, not truncated)."""
        if not isinstance(requests, (list, tuple)):
            raise TraceFormatError(f"{source}: requests must be a list of block-id lists, got {validate.show(requests)}")
        if input_lengths is not None and (not isinstance(input_lengths, (list, tuple, np.ndarray)) or len(input_lengths) != len(requests)):
            raise TraceFormatError(f"{source}: input_lengths must be a list of one int per request ({len(requests)}), got {validate.show(input_lengths)}")
        lines = []
        for i, req in enumerate(requests):
            where = f"{source}:{i + 1}:"
            ids = validate.index_array(req, f"{where} block ids", lo=0, hi=2**63, error=TraceFormatError, type_error=TraceFormatError)
            line = {"blocks": ids.tolist()}
            if input_lengths is not None:
                line["input_length"] = validate.integer(input_lengths[i], f"{where} input_length", lo=0, hi=2**63, error=TraceFormatError)
            lines.append(line)
        return _build(_parse_records(lines, _JSONL, source, block_tokens, line_numbers=range(1, len(lines) + 1)))


# ---------------------------------------------------------------------------------------------
# Line formats: the field holding the block ids and the fields a line must have


@dataclass(frozen=True)
class _Format:
    blocks_field: str
    required: tuple[str, ...]


_MOONCAKE = _Format("hash_ids", ("timestamp", "input_length", "output_length", "hash_ids"))
_JSONL = _Format("blocks", ("blocks",))


def _fail(source: str, line: int, msg: str) -> TraceFormatError:
    return TraceFormatError(f"{source}:{line}: {msg}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class _Records:
    """Parsed, per-line-validated requests (before the cross-request checks)."""

    def __init__(self, source: str, block_tokens: int) -> None:
        self.source = source
        self.block_tokens = block_tokens
        self.lines: list[int] = []
        self.blocks: list[list[int]] = []
        self.timestamp: list[float] = []
        self.input_length: list[int] = []
        self.output_length: list[int] = []


def _parse_records(objects, fmt: _Format, source: str, block_tokens: int, line_numbers) -> _Records:
    block_tokens = validate.integer(block_tokens, "block_tokens", lo=1, hi=2**31)
    rec = _Records(source, block_tokens)
    for line, obj in zip(line_numbers, objects):
        if not isinstance(obj, dict):
            raise _fail(source, line, f"expected a JSON object, got {type(obj).__name__}")
        missing = [f for f in fmt.required if f not in obj]
        if missing:
            raise _fail(source, line, f"missing field(s) {missing}")
        ids = obj[fmt.blocks_field]
        if not isinstance(ids, list):
            raise _fail(source, line, f"{fmt.blocks_field!r} must be a list of non-negative ints, got {validate.show(ids)}")
        bad = [b for b in ids if not (_is_int(b) and 0 <= b < 2**63)]
        if bad:
            raise _fail(source, line, f"{fmt.blocks_field!r} must be a list of non-negative ints < 2**63, got {validate.show(bad[0])}")
        if len(set(ids)) != len(ids):
            raise _fail(source, line, f"{fmt.blocks_field!r} repeats a block id")
        n = len(ids)
        ts = obj.get("timestamp", float(len(rec.lines)))
        inp = obj.get("input_length", n * block_tokens)
        out = obj.get("output_length", 0)
        if not _is_number(ts) or not np.isfinite(ts):
            raise _fail(source, line, f"timestamp must be a finite number, got {ts!r}")
        for name, v in (("input_length", inp), ("output_length", out)):
            if not _is_int(v) or not 0 <= v < 2**63:
                raise _fail(source, line, f"{name} must be a non-negative int < 2**63, got {validate.show(v)}")
        if -(-inp // block_tokens) != n:
            raise _fail(
                source, line,
                f"input_length={inp} needs ceil({inp}/{block_tokens})={-(-inp // block_tokens)} blocks "
                f"but {fmt.blocks_field!r} has {n}",
            )
        rec.lines.append(line)
        rec.blocks.append(ids)
        rec.timestamp.append(float(ts))
        rec.input_length.append(inp)
        rec.output_length.append(out)
    return rec


def _build(rec: _Records) -> Trace:
    """Flatten, remap ids to dense indices and check positions agree across requests."""
    bt = rec.block_tokens
    lengths = np.fromiter((len(b) for b in rec.blocks), dtype=np.int64, count=len(rec.blocks))
    offsets = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    raw = np.fromiter((b for req in rec.blocks for b in req), dtype=np.int64, count=total)
    req_of = np.repeat(np.arange(lengths.shape[0], dtype=np.int64), lengths)
    index = np.arange(total, dtype=np.int64) - offsets[:-1][req_of]  # block index within its request
    input_length = np.asarray(rec.input_length, dtype=np.int64).reshape(-1)
    tokens = np.minimum(bt, input_length[req_of] - index * bt) if total else np.zeros(0, dtype=np.int64)

    uniq, first, dense = np.unique(raw, return_index=True, return_inverse=True)
    # Renumber dense ids by first appearance so a trace's ids read in time order.
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.shape[0])
    dense = rank[dense.reshape(-1)]
    first = first[order]
    position = index[first] * bt
    bad = np.flatnonzero(index * bt != position[dense])
    if bad.size:
        i = int(bad[0])
        raise _fail(
            rec.source, rec.lines[int(req_of[i])],
            f"block id {int(raw[i])} is at token {int(index[i]) * bt} here but at token "
            f"{int(position[dense[i]])} in an earlier request",
        )
    num_tokens = np.zeros(first.shape[0], dtype=np.int32)
    np.maximum.at(num_tokens, dense, tokens.astype(np.int32))
    return Trace(
        offsets=offsets,
        blocks=dense.astype(np.int64),
        block_ids=uniq[order],
        position=position,
        num_tokens=num_tokens,
        first_read=first.astype(np.int64),
        first_request=req_of[first],
        timestamp=np.asarray(rec.timestamp, dtype=np.float64).reshape(-1),
        input_length=input_length,
        output_length=np.asarray(rec.output_length, dtype=np.int64).reshape(-1),
        block_tokens=bt,
        source=rec.source,
    )


def _read_lines(path: str | os.PathLike, limit: int | None):
    """(line number, parsed object) for the non-blank lines of ``path``, at most ``limit``."""
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"a trace path must be a string or path, got {validate.show(path)}")
    source = os.fspath(path)
    if limit is not None:
        limit = validate.integer(limit, "limit (None for all requests)", lo=1)
    try:
        f = open(source, "rb")
    except OSError as e:
        raise TraceFormatError(f"{source}: cannot open trace ({e.strerror})") from None
    lines, objects = [], []
    with f:
        for number, raw in enumerate(f, start=1):
            if limit is not None and len(objects) >= limit:
                break
            if not raw.strip():
                continue
            try:
                objects.append(json.loads(raw))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise _fail(source, number, f"invalid JSON ({e})") from None
            lines.append(number)
    if not objects:
        raise TraceFormatError(f"{source}: the trace holds no requests (the file is empty or blank)")
    return source, lines, objects


def load_mooncake(path: str | os.PathLike, *, block_tokens: int = 512, limit: int | None = None) -> Trace:
    """Load a Mooncake trace (see the module docstring); ``limit`` keeps the first requests."""
    source, lines, objects = _read_lines(path, limit)
    return _build(_parse_records(objects, _MOONCAKE, source, block_tokens, lines))


def load_jsonl(path: str | os.PathLike, *, block_tokens: int = 16, limit: int | None = None) -> Trace:
    """Load a generic JSONL trace (see the module docstring); ``limit`` keeps the first requests."""
    source, lines, objects = _read_lines(path, limit)
    return _build(_parse_records(objects, _JSONL, source, block_tokens, lines))


#: format name -> loader(path, *, block_tokens, limit)
TRACE_FORMATS: dict[str, Callable[..., Trace]] = {"mooncake": load_mooncake, "jsonl": load_jsonl}

#: default tokens per block of each format
DEFAULT_BLOCK_TOKENS: dict[str, int] = {"mooncake": 512, "jsonl": 16}


def load_trace(path: str | os.PathLike, format: str = "mooncake", *, block_tokens: int | None = None,
               limit: int | None = None) -> Trace:
    """Load ``path`` in a named format (:data:`TRACE_FORMATS`); ``block_tokens`` defaults per format."""
    loader = TRACE_FORMATS.get(format) if isinstance(format, str) else None
    if loader is None:
        raise ConfigError(f"unknown trace format {validate.show(format)}; known: {sorted(TRACE_FORMATS)}")
    return loader(path, block_tokens=DEFAULT_BLOCK_TOKENS[format] if block_tokens is None else block_tokens, limit=limit)
