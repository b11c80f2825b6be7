"""Trace loaders: the Mooncake and generic JSONL formats, and errors that name the line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvstore.errors import ConfigError, TraceFormatError
from kvstore.evict.trace import Trace, load_jsonl, load_mooncake, load_trace

TINY = Path(__file__).parent / "data" / "tiny_mooncake.jsonl"


def _write(tmp_path, lines) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def test_tiny_trace_arrays_match_the_file():
    trace = load_mooncake(TINY)
    rows = [json.loads(l) for l in TINY.read_text().splitlines()]
    assert trace.num_requests == len(rows)
    assert trace.num_block_requests == sum(len(r["hash_ids"]) for r in rows)
    for r, row in enumerate(rows):
        assert trace.block_ids[trace.request(r)].tolist() == row["hash_ids"]
        assert trace.input_length[r] == row["input_length"]
        # block i of the request starts at token i * 512; the last holds the remainder
        assert trace.position[trace.request(r)].tolist() == [512 * i for i in range(len(row["hash_ids"]))]
        assert trace.num_tokens[trace.request(r)[-1]] >= row["input_length"] - 512 * (len(row["hash_ids"]) - 1)
    assert set(trace.block_ids.tolist()) == {b for row in rows for b in row["hash_ids"]}


def test_next_use_and_first_read():
    trace = Trace.from_requests([[5, 6], [5], [7, 8], [5, 6]])
    # blocks:        5 6 | 5 | 7 8 | 5 6     (indices 0..6)
    assert trace.next_use().tolist() == [2, 6, 5, 7, 7, 7, 7]
    assert trace.is_first_read().tolist() == [True, True, False, True, True, False, False]


def test_generic_jsonl_defaults(tmp_path):
    path = _write(tmp_path, [{"blocks": [10, 11]}, "", {"blocks": [10], "timestamp": 3.5, "input_length": 3}])
    trace = load_jsonl(path, block_tokens=4)
    assert trace.num_requests == 2
    assert trace.input_length.tolist() == [8, 3]
    assert trace.timestamp.tolist() == [0.0, 3.5]
    assert trace.num_tokens.tolist() == [4, 4]  # block 10 is full in request 0
    assert load_trace(path, "jsonl", block_tokens=4).num_block_requests == 3


GOOD = {"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [0, 1]}


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"timestamp": 0, "input_length": 600, "output_le', "invalid JSON"),
        ({"timestamp": 0, "input_length": 600, "hash_ids": [0, 1]}, "missing field"),
        ({**GOOD, "input_length": -1}, "input_length must be a non-negative int"),
        ({**GOOD, "output_length": -3}, "output_length must be a non-negative int"),
        ({**GOOD, "hash_ids": [0, -1]}, "non-negative ints"),
        ({**GOOD, "hash_ids": [0, 1, 2]}, "needs ceil(600/512)=2 blocks"),
        ({**GOOD, "hash_ids": [0, 0]}, "repeats a block id"),
        ({**GOOD, "hash_ids": [1, 0]}, "block id 1 is at token 0 here but at token 512"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path, [GOOD, GOOD, bad])
    with pytest.raises(TraceFormatError) as err:
        load_mooncake(path)
    assert f"{path}:3:" in str(err.value)
    assert message in str(err.value)


def test_limit_stops_before_a_bad_line(tmp_path):
    path = _write(tmp_path, [GOOD, '{"truncated'])
    assert load_mooncake(path, limit=1).num_requests == 1
    with pytest.raises(TraceFormatError, match=":2:"):
        load_mooncake(path)


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown trace format 'csv'"):
        load_trace(TINY, "csv")
    with pytest.raises(TraceFormatError, match="cannot open"):
        load_mooncake(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="block_tokens"):
        load_mooncake(TINY, block_tokens=0)


def test_ids_are_dense_in_order_of_first_appearance():
    trace = Trace.from_requests([[900, 7], [900, 7, 2**40]])
    assert trace.blocks.tolist() == [0, 1, 0, 1, 2]
    assert trace.block_ids.tolist() == [900, 7, 2**40]
    assert np.array_equal(trace.first_request, [0, 0, 1])
