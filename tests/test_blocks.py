import numpy as np
import pytest
import torch

from kvstore.blocks import BlockPool
from kvstore.errors import BlockStateError, CapacityError, ConfigError, OutOfRangeError


def test_allocate_release_lifo_and_accounting(small_spec):
    pool = BlockPool(small_spec, 5, name="device")
    assert pool.kv.shape == (5, *small_spec.block_shape)
    a = pool.allocate(np.array([10, 11]))
    assert a.tolist() == [0, 1]
    assert pool.owner[a].tolist() == [10, 11] and pool.refcount[a].tolist() == [1, 1]
    assert pool.num_used == 2 and pool.bytes_used == 2 * small_spec.bytes_per_block
    pool.release(a[:1])
    assert pool.allocate(np.array([12])).tolist() == [0]  # most recently freed first
    pool.check()


def test_allocate_too_many_names_numbers_and_changes_nothing(small_spec):
    pool = BlockPool(small_spec, 3, name="device")
    pool.allocate(np.array([1, 2]))
    before = (pool.num_free, pool.refcount.copy(), pool.owner.copy())
    with pytest.raises(CapacityError, match=r"need 2 free blocks, have 1 of 3"):
        pool.allocate(np.array([3, 4]))
    assert (pool.num_free, pool.refcount.tolist(), pool.owner.tolist()) == (before[0], before[1].tolist(), before[2].tolist())
    pool.check()


def test_double_free_and_out_of_range_are_rejected_atomically(small_spec):
    pool = BlockPool(small_spec, 4, name="host")
    slots = pool.allocate(np.array([7, 8, 9]))
    pool.release(slots[:1])
    with pytest.raises(BlockStateError, match=r"slots \[0\] are not allocated"):
        pool.release(slots[:2])  # slot 0 is free already: nothing released, not even slot 1
    assert pool.refcount[slots[1]] == 1
    with pytest.raises(OutOfRangeError, match=r"\[4\] out of range \[0, 4\)"):
        pool.release(np.array([4]))
    with pytest.raises(BlockStateError, match="more than once"):
        pool.release(np.array([1, 1]))
    assert pool.refcount[1] == 1
    pool.check()


def test_layer_view_is_a_strided_view(small_spec):
    pool = BlockPool(small_spec, 3)
    k1 = pool.layer_view(1, 0)
    assert k1.shape == (3, small_spec.block_size, small_spec.num_kv_heads, small_spec.head_dim)
    assert k1.data_ptr() == pool.kv[0, 1, 0].data_ptr()
    k1.fill_(3.0)
    assert torch.all(pool.kv[:, 1, 0] == 3.0)


def test_bad_pool_size(small_spec):
    with pytest.raises(ConfigError, match="-1"):
        BlockPool(small_spec, -1)
