"""Cold tiers below the host tier, through LMCache's storage backends.

- :class:`LMCacheColdTier` (``cold_tier.path``): LMCache's LocalDiskBackend on this machine.
  Host-tier victims spill to it.
- :class:`LMCacheRemoteTier` (``cold_tier.remote_url``): a Redis-protocol server through
  LMCache's RedisConnector, shared by every engine pointed at it. Victims spill to it and,
  with ``write_through`` (the default there), every block the host tier saves is published
  at once, so a prefix one engine computed serves the others.
- :class:`LayeredColdTier`: both; a read tries the disk first.

A worker-side tier offers ``put`` (a victim), ``publish`` (a saved block, write-through),
``get_many`` (reads, each True or False: a False is a load error that vLLM recomputes),
``flush`` and ``close``. Keys are ints: a block's vLLM prefix hash read big-endian
(:func:`cold_key`). ``lmcache`` is imported only when a tier is built.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

# LMCache logs every connector it discovers at INFO (dozens of lines per tier); kvstore's tiers
# report what matters themselves. An LMCACHE_LOG_LEVEL the user set wins.
os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")

from kvstore.integrations.lmcache.config import REMOTE_SCHEMES, ColdTierConfig  # noqa: E402
from kvstore.integrations.lmcache.disk import LMCacheColdTier  # noqa: E402
from kvstore.integrations.lmcache.remote import LMCacheRemoteTier, RemoteStats  # noqa: E402
from kvstore.spec import KVSpec  # noqa: E402

__all__ = [
    "REMOTE_SCHEMES", "ColdTierConfig", "LMCacheColdTier", "LMCacheRemoteTier", "LayeredColdTier", "RemoteStats",
    "cold_key", "open_cold_tier",
]


def cold_key(block_hash: bytes) -> int:
    """The cold-tier key of a block: its vLLM prefix hash as a big-endian integer."""
    return int.from_bytes(block_hash, "big")


class LayeredColdTier:
    """Several cold tiers as one: writes go to each, a read takes the first tier that has the block."""

    def __init__(self, tiers: Sequence) -> None:
        self.tiers = list(tiers)

    def put(self, key: int, block: torch.Tensor) -> bool:
        return any([t.put(key, block) for t in self.tiers])  # a list: every tier gets it

    def publish(self, key: int, block: torch.Tensor) -> bool:
        return any([t.publish(key, block) for t in self.tiers])

    def get_many(self, keys: Sequence[int], outs: Sequence[torch.Tensor]) -> list[bool]:
        got = [False] * len(keys)
        for tier in self.tiers:
            todo = [i for i, g in enumerate(got) if not g]
            if not todo:
                break
            for i, ok in zip(todo, tier.get_many([keys[i] for i in todo], [outs[i] for i in todo])):
                got[i] = ok
        return got

    def get(self, key: int, out: torch.Tensor) -> bool:
        return self.get_many([key], [out])[0]

    def flush(self, timeout: float = 30.0) -> None:
        for t in self.tiers:
            t.flush(timeout)

    def close(self) -> None:
        errors = []
        for t in self.tiers:
            try:
                t.close()
            except Exception as e:  # noqa: BLE001 - close every tier, then report
                errors.append(e)
        if errors:
            raise errors[0]


def open_cold_tier(config: ColdTierConfig, spec: KVSpec, *, model_name: str, world_size: int = 1, worker_id: int = 0):
    """The worker-side cold tier ``config`` describes: disk, remote, or both layered."""
    ns = dict(model_name=model_name, world_size=world_size, worker_id=worker_id)
    tiers = []
    if config.path is not None:
        tiers.append(LMCacheColdTier(config, spec, **ns))
    if config.remote_url is not None:
        tiers.append(LMCacheRemoteTier(config, spec, **ns))
    return tiers[0] if len(tiers) == 1 else LayeredColdTier(tiers)
