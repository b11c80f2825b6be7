"""Cold tier: host-tier victims spill to an LMCache storage backend and are read back on a hit.

The tier stores whole kvstore blocks (``KVSpec.block_shape == (L, 2, block_size, Hkv, D)``)
under an integer key (the vLLM prefix hash of the block) in LMCache's ``LocalDiskBackend``,
configured through LMCache's own ``LMCacheEngineConfig`` (``local_disk``,
``max_local_disk_size``). Writes are asynchronous (LMCache's disk worker); reads are blocking
and bit-exact. LMCache evicts on its own when the disk budget is full, so a key the caller
believes cold may be gone: :meth:`LMCacheColdTier.get` then returns False and the caller
reports the load as failed (vLLM recomputes).

``lmcache`` is imported only when a :class:`LMCacheColdTier` is constructed, so kvstore (and
this config class) import without it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import torch

from kvstore.errors import BlockStateError, ConfigError, ShapeError
from kvstore.spec import KVSpec

__all__ = ["ColdTierConfig", "LMCacheColdTier"]


@dataclass(frozen=True, kw_only=True)
class ColdTierConfig:
    """Where and how much the cold tier stores.

    Attributes:
        path: directory of LMCache's LocalDiskBackend (created if missing).
        max_gib: disk budget in GiB; LMCache evicts (LRU) beyond it.
        io_threads: LMCache disk I/O threads.
    """

    path: str
    max_gib: float = 16.0
    io_threads: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError(f"cold_tier.path must be a non-empty string, got {self.path!r}")
        if isinstance(self.max_gib, bool) or not isinstance(self.max_gib, (int, float)) or not self.max_gib > 0:
            raise ConfigError(f"cold_tier.max_gib must be a number > 0, got {self.max_gib!r}")
        if isinstance(self.io_threads, bool) or not isinstance(self.io_threads, int) or self.io_threads <= 0:
            raise ConfigError(f"cold_tier.io_threads must be a positive int, got {self.io_threads!r}")

    @classmethod
    def from_dict(cls, raw: object) -> "ColdTierConfig":
        """Parse the ``cold_tier`` entry of the connector's extra config (unknown keys rejected by name)."""
        if not isinstance(raw, dict):
            raise ConfigError(f"cold_tier must be a dict like {{'path': '/mnt/kv'}}, got {raw!r}")
        known = {"path", "max_gib", "io_threads"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown cold_tier key(s) {unknown}; known: {sorted(known)}")
        if "path" not in raw:
            raise ConfigError("cold_tier.path is required")
        return cls(**raw)

    def capacity_blocks(self, spec: KVSpec) -> int:
        """Blocks of ``spec`` that fit in the disk budget."""
        return int(self.max_gib * 2**30) // spec.bytes_per_block


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
        self,
        config: ColdTierConfig,
        spec: KVSpec,
        *,
        model_name: str = "kvstore",
        world_size: int = 1,
        worker_id: int = 0,
    ) -> None:
        from lmcache.utils import CacheEngineKey
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.memory_management import MemoryFormat
        from lmcache.v1.metadata import LMCacheMetadata
        from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
        from lmcache.v1.storage_backend.local_disk_backend import LocalDiskBackend

        self.config = config
        self.spec = spec
        self._key_cls = CacheEngineKey
        self._fmt = MemoryFormat.KV_2LTD
        self._namespace = (model_name, world_size, worker_id)
        # Staging buffers for reads and in-flight writes: enough for a few hundred blocks.
        staging_gib = max(64 * spec.bytes_per_block, 2**26) / 2**30
        engine_config = LMCacheEngineConfig.from_defaults(
            chunk_size=spec.block_size,
            local_cpu=False,
            max_local_cpu_size=staging_gib,
            local_disk=config.path,
            max_local_disk_size=float(config.max_gib),
            extra_config={"disk_io_threads": config.io_threads},
        )
        metadata = LMCacheMetadata(
            model_name=model_name,
            world_size=world_size,
            local_world_size=world_size,
            worker_id=worker_id,
            local_worker_id=worker_id,
            kv_dtype=spec.dtype,
            kv_shape=(spec.num_layers, 2, spec.block_size, spec.num_kv_heads, spec.head_dim),
        )
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="kvstore-cold-io", daemon=True)
        self._loop_thread.start()
        self._cpu = LocalCPUBackend(engine_config, metadata, dst_device="cpu")
        self._disk = LocalDiskBackend(engine_config, self._loop, self._cpu, dst_device="cpu")
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

    def put(self, key: int, block: torch.Tensor) -> None:
        """Copy ``block: [L, 2, block_size, Hkv, D]`` (CPU) and write it to disk asynchronously.

        The copy is taken before returning, so the caller may overwrite ``block`` at once.
        A key already stored is only touched. When LMCache has no staging memory or disk
        budget left the block is not stored (a later :meth:`get` misses; nothing raises).
        """
        self._check_block(block, "put")
        k = self._key(key)
        obj = self._cpu.allocate(torch.Size(self.spec.block_shape), self.spec.dtype, self._fmt)
        if obj is None:
            return
        obj.tensor.copy_(block)
        with self._lock:
            self._submitted.append(k)
        self._disk.submit_put_task(k, obj)
        obj.ref_count_down()

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
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(timeout=5)
