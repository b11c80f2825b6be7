"""Copy ordering, checked on the CPU with a stream whose copies land late (tests/late_stream.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstore.blocks import BlockPool
from kvstore.spec import KVSpec
from kvstore.transfer import BlockMover
from late_stream import LateStream

SPEC = KVSpec(num_layers=2, num_kv_heads=2, num_q_heads=4, head_dim=8, dtype=torch.float32, block_size=4)


@pytest.fixture
def tiers():
    g = torch.Generator().manual_seed(11)
    dev = BlockPool(SPEC, 6, name="device", host=False)
    host = BlockPool(SPEC, 6, name="host")
    dev.kv.copy_(torch.randn(dev.kv.shape, generator=g) + 0.5)
    host.kv.copy_(torch.randn(host.kv.shape, generator=g) - 0.5)
    stream = LateStream()
    return dev, host, BlockMover("cpu", stream=stream), stream


def test_a_copy_to_host_is_visible_to_the_cpu_only_after_a_host_wait(tiers):
    dev, host, mover, _ = tiers
    expect = dev.kv[[4, 1]].clone()
    handle = mover.copy(dev, np.array([4, 1]), host, np.array([2, 3]))
    assert torch.isnan(host.kv[[2, 3]]).all()  # in flight: poisoned
    handle.wait()  # the compute stream waits: a kernel could read it, the CPU not yet
    assert torch.isnan(host.kv[[2, 3]]).all()
    mover.wait_writes(host, np.array([3]))
    assert torch.equal(host.kv[[2, 3]], expect)
    assert handle.done()


def test_a_device_reader_of_host_memory_waits_without_a_host_block(tiers):
    dev, host, mover, _ = tiers
    expect = dev.kv[[0]].clone()
    mover.copy(dev, np.array([0]), host, np.array([5]))
    mover.wait_writes(host, host=False)  # a UVA kernel on the compute stream
    assert torch.equal(host.kv[5], expect[0])


def test_copies_run_in_submit_order_and_read_their_source_when_they_run(tiers):
    dev, host, mover, _ = tiers
    first = dev.kv[3].clone()
    mover.copy(dev, np.array([3]), host, np.array([0]))  # device 3 -> host 0
    back = mover.copy(host, np.array([0]), dev, np.array([5]))  # host 0 -> device 5, after it
    back.wait()
    assert torch.equal(dev.kv[5], first)  # the second copy saw the first one's data


def test_a_source_written_after_the_wait_does_not_change_what_was_copied(tiers):
    dev, host, mover, _ = tiers
    before = dev.kv[2].clone()
    handle = mover.copy(dev, np.array([2]), host, np.array([1]))
    handle.wait()  # ordered: later compute-stream writes to device slot 2 come after the copy read it
    dev.kv[2].fill_(7.0)
    mover.synchronize()
    assert torch.equal(host.kv[1], before)


def test_a_source_written_before_the_wait_is_what_a_late_copy_moves(tiers):
    """The hazard the store must avoid: reusing a copy's source before ordering after it."""
    dev, host, mover, _ = tiers
    mover.copy(dev, np.array([2]), host, np.array([1]))
    dev.kv[2].fill_(7.0)  # no wait: on a GPU the copy might read this
    mover.synchronize()
    assert torch.equal(host.kv[1], torch.full_like(host.kv[1], 7.0))


def test_wait_writes_does_not_block_for_slots_without_copies_in_flight(tiers):
    dev, host, mover, stream = tiers
    mover.copy(dev, np.array([0, 1]), host, np.array([0, 1]))
    mover.wait_writes(host, np.array([4, 5]))  # nothing in flight there
    assert stream.pending == 1
    mover.wait_writes(host, np.array([5, 1]))
    assert stream.pending == 0


def test_stats_count_bytes_per_direction(tiers):
    dev, host, mover, _ = tiers
    mover.copy(dev, np.array([0, 1, 2]), host, np.array([5, 3, 4]))
    mover.copy(host, np.array([3]), dev, np.array([5]))
    mover.copy(dev, np.array([1]), dev, np.array([4]))
    b = SPEC.bytes_per_block
    s = mover.stats
    assert (s.d2h_bytes, s.h2d_bytes, s.d2d_bytes, s.copies) == (3 * b, b, b, 3)
