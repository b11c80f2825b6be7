"""Local cold tier: host-tier victims in LMCache's ``LocalDiskBackend``, read back on a hit.

The tier stores whole kvstore blocks (``KVSpec.block_shape == (L, 2, block_size, Hkv, D)``)
under an integer key (the vLLM prefix hash of the block), configured through LMCache's own
``LMCacheEngineConfig`` (``local_disk``, ``max_local_disk_size``). Writes are asynchronous
(LMCache's disk worker); reads are blocking and bit-exact. LMCache evicts on its own when
the disk budget is full, so a key the caller believes cold may be gone: :meth:`get` then
returns False and the caller reports the load as failed (vLLM recomputes).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence

import torch

from kvstore import validate
from kvstore.errors import BlockStateError, ConfigError, ShapeError
from kvstore.integrations.lmcache.config import ColdTierConfig
from kvstore.integrations.lmcache.runtime import LMCacheRuntime
from kvstore.spec import KVSpec

__all__ = ["LMCacheColdTier"]


def _check_directory(path: str) -> None:
    """Create ``path`` if missing and write (and remove) a file there, so that a path the disk
    backend cannot use is a ConfigError naming it at startup, not an OSError at the first spill.
    Nothing of LMCache is set up before it."""
    try:
        os.makedirs(path, exist_ok=True)
        validate.probe_write(path)
    except OSError as e:
        raise ConfigError(f"cold_tier.path {path!r} is not a writable directory: {e.strerror}") from None


class LMCacheColdTier:
    """kvstore blocks in LMCache's LocalDiskBackend.

    Args:
        config: path and budget.
        spec: block shape and dtype of what is stored.
        model_name, world_size, worker_id: LMCache key namespace (one per tensor-parallel rank).

    Thread-safe: LMCache's backends lock internally; the only state kept here, the keys
    written since the last :meth:`flush`, is guarded by a lock.
    """

    def __init__(
        self, config: ColdTierConfig, spec: KVSpec, *, model_name: str = "kvstore", world_size: int = 1, worker_id: int = 0,
    ) -> None:
        from lmcache.utils import CacheEngineKey
        from lmcache.v1.memory_management import MemoryFormat
        from lmcache.v1.storage_backend.local_disk_backend import LocalDiskBackend

        if config.path is None:
            raise ConfigError("LMCacheColdTier needs cold_tier.path")
        _check_directory(config.path)
        self.config = config
        self.spec = spec
        self._key_cls = CacheEngineKey
        self._fmt = MemoryFormat.KV_2LTD
        self._namespace = (model_name, world_size, worker_id)
        # Staging buffers for reads and in-flight writes: enough for a few hundred blocks.
        self._rt = LMCacheRuntime(
            spec, model_name=model_name, world_size=world_size, worker_id=worker_id,
            staging_bytes=max(64 * spec.bytes_per_block, 2**26),
            local_disk=config.path, max_local_disk_size=float(config.max_gib),
            extra_config={"disk_io_threads": config.io_threads},
        )
        self._disk = LocalDiskBackend(self._rt.config, self._rt.loop, self._rt.cpu, dst_device="cpu")
        self._lock = threading.Lock()
        self._submitted: list = []  # keys written since the last flush

    def _key(self, key: int):
        model_name, world_size, worker_id = self._namespace
        return self._key_cls(model_name=model_name, world_size=world_size, worker_id=worker_id, chunk_hash=key, dtype=self.spec.dtype)

    def _check_block(self, block: torch.Tensor, what: str) -> None:
        if tuple(block.shape) != self.spec.block_shape or block.dtype != self.spec.dtype or block.device.type != "cpu":
            raise ShapeError(
                f"cold tier {what}: block must be a CPU {self.spec.dtype} tensor of shape {self.spec.block_shape}, "
                f"got {block.dtype} {tuple(block.shape)} on {block.device}"
            )

    def contains(self, key: int) -> bool:
        """Whether ``key`` is on disk (or being written)."""
        k = self._key(key)
        return self._disk.contains(k) or self._disk.exists_in_put_tasks(k)

    def put(self, key: int, block: torch.Tensor) -> bool:
        """Copy ``block: [L, 2, block_size, Hkv, D]`` (CPU) and write it to disk asynchronously.

        The copy is taken before returning, so the caller may overwrite ``block`` at once.
        A key already stored is only touched. When LMCache has no staging memory or disk
        budget left the block is not stored (returns False; a later :meth:`get` misses).
        """
        self._check_block(block, "put")
        k = self._key(key)
        obj = self._rt.cpu.allocate(torch.Size(self.spec.block_shape), self.spec.dtype, self._fmt)
        if obj is None:
            return False
        obj.tensor.copy_(block)
        with self._lock:
            self._submitted.append(k)
        self._disk.submit_put_task(k, obj)
        obj.ref_count_down()
        return True

    def publish(self, key: int, block: torch.Tensor) -> bool:
        """A local disk takes victims only: saved blocks are not written through (False)."""
        return False

    def get(self, key: int, out: torch.Tensor) -> bool:
        """Read block ``key`` into ``out: [L, 2, block_size, Hkv, D]`` (CPU); False when it is gone."""
        self._check_block(out, "get")
        obj = self._disk.get_blocking(self._key(key))
        if obj is None:
            return False
        try:
            src = obj.tensor
            if src is None or src.numel() != out.numel():
                raise BlockStateError(f"cold tier: block {key:#x} has {0 if src is None else src.numel()} elements, expected {out.numel()}")
            out.copy_(src.view(out.shape))
        finally:
            obj.ref_count_down()
        return True

    def get_many(self, keys: Sequence[int], outs: Sequence[torch.Tensor]) -> list[bool]:
        """:meth:`get` of each key; ``[i]`` says whether ``outs[i]`` holds block ``keys[i]``."""
        if len(keys) != len(outs):
            raise ShapeError(f"cold tier get_many: {len(keys)} keys but {len(outs)} output blocks")
        return [self.get(k, o) for k, o in zip(keys, outs)]

    def flush(self, timeout: float = 30.0) -> None:
        """Block until every write issued so far is on disk (TimeoutError after ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            waiting, self._submitted = self._submitted, []
        while waiting:
            waiting = [k for k in waiting if self._disk.exists_in_put_tasks(k)]
            if waiting:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cold tier: {len(waiting)} writes still pending after {timeout} s")
                time.sleep(1e-3)

    def close(self) -> None:
        """Finish pending writes and stop LMCache's I/O threads."""
        try:
            self.flush()
        finally:
            self._disk.close()
            self._rt.stop()
