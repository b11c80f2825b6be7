"""What every LMCache backend needs: its engine config and metadata, an asyncio loop on a thread,
and a CPU staging allocator. ``lmcache`` is imported only when one is built."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import torch

from kvstore.integrations.lmcache.codec import CorruptBlockError
from kvstore.spec import KVSpec

__all__ = ["LMCacheRuntime"]


def _bounded_cpu_backend_class():
    from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

    class BoundedCPUBackend(LocalCPUBackend):
        """LocalCPUBackend that never waits for memory and only hands out ``nbytes``-sized buffers.

        LMCache's connectors allocate read buffers with ``busy_loop=True``: a value whose stored
        metadata claims more bytes than the staging pool holds (a damaged or foreign value)
        would then sleep on the connector's event loop forever and stall every remote call.
        Here such a request fails at once (CorruptBlockError: the read fails as damaged) and a
        full pool returns None instead of waiting.
        """

        allowed_bytes: int | None = None

        def allocate(self, shapes, dtypes, fmt=None, eviction: bool = True, busy_loop: bool = True):
            if self.allowed_bytes is not None:
                shape_list = shapes if isinstance(shapes, list) else [shapes]
                dtype_list = dtypes if isinstance(dtypes, list) else [dtypes] * len(shape_list)
                total = sum(torch.Size(s).numel() * d.itemsize for s, d in zip(shape_list, dtype_list))
                if total != self.allowed_bytes:
                    raise CorruptBlockError(f"stored value claims {total} bytes; blocks here are {self.allowed_bytes}")
            return super().allocate(shapes, dtypes, fmt, eviction=False, busy_loop=False)

    return BoundedCPUBackend


class LMCacheRuntime:
    """LMCache engine config, metadata, event loop thread and CPU staging for one kvstore tier.

    Args:
        spec: block shape and dtype (LMCache's ``kv_shape`` and chunk size).
        model_name, world_size, worker_id: LMCache key namespace.
        staging_bytes: CPU staging memory.
        buffer_bytes: if set, the only allocation size the staging pool serves.
        **engine_config: more ``LMCacheEngineConfig.from_defaults`` fields (local_disk, remote_url, ...).
    """

    def __init__(
        self, spec: KVSpec, *, model_name: str, world_size: int, worker_id: int, staging_bytes: int,
        buffer_bytes: int | None = None, **engine_config: Any,
    ) -> None:
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.metadata import LMCacheMetadata

        self.config = LMCacheEngineConfig.from_defaults(
            chunk_size=spec.block_size, local_cpu=False, max_local_cpu_size=staging_bytes / 2**30, **engine_config,
        )
        self.metadata = LMCacheMetadata(
            model_name=model_name,
            world_size=world_size,
            local_world_size=world_size,
            worker_id=worker_id,
            local_worker_id=worker_id,
            kv_dtype=spec.dtype,
            kv_shape=(spec.num_layers, 2, spec.block_size, spec.num_kv_heads, spec.head_dim),
        )
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="kvstore-lmcache-io", daemon=True)
        self._thread.start()
        self.cpu = _bounded_cpu_backend_class()(self.config, self.metadata, dst_device="cpu")
        self.cpu.allowed_bytes = buffer_bytes

    def submit(self, coro):
        """Run ``coro`` on the loop; returns its concurrent future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        """Stop the loop thread (pending callbacks are dropped)."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
