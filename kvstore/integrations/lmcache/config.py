"""``cold_tier`` of the connector's extra config: a local LMCache disk, a remote LMCache server, or both."""

from __future__ import annotations

from dataclasses import dataclass, fields
from urllib.parse import urlsplit

from kvstore import validate
from kvstore.errors import ConfigError
from kvstore.spec import KVSpec

__all__ = ["ColdTierConfig", "REMOTE_SCHEMES"]

# Redis-protocol servers (Redis, Valkey, KeyDB, ...) through LMCache's RedisConnector.
REMOTE_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True, kw_only=True)
class ColdTierConfig:
    """Where and how the cold tier stores blocks.

    At least one of ``path`` and ``remote_url`` is set. With both, a host victim spills to
    both and a lookup finds a block in either (disk first).

    Attributes:
        path: directory of LMCache's LocalDiskBackend (created if missing), or None.
        remote_url: a Redis-protocol server shared by several engines, e.g.
            ``redis://10.0.0.5:6379`` (also ``rediss://`` and ``unix://``), or None. The server
            owns its memory budget (``maxmemory`` with an ``allkeys-lru`` policy).
        max_gib: disk budget in GiB; LMCache evicts (LRU) beyond it.
        io_threads: LMCache disk I/O threads.
        timeout_s: the longest a remote lookup, read or connection attempt may take; a step
            never waits longer for the server (a slow read is a load error, recomputed).
        retry_interval_s: after a remote failure (refused, timed out) the tier is treated as
            empty for this long, then tried again, so a dead server costs one timeout per
            interval, not one per block.
        write_through: also publish every block the host tier saves to the remote tier (not
            only its victims), so other engines find it at once. Default: on with a remote.
        staging_mib: LMCache staging memory for reads and in-flight remote writes; writes
            that find it full are dropped (a slow server never grows memory).
    """

    path: str | None = None
    remote_url: str | None = None
    max_gib: float = 16.0
    io_threads: int = 4
    timeout_s: float = 1.0
    retry_interval_s: float = 2.0
    write_through: bool | None = None
    staging_mib: float = 256.0

    def __post_init__(self) -> None:
        if self.path is not None and (not isinstance(self.path, str) or not self.path):
            raise ConfigError(f"cold_tier.path must be a non-empty string, got {validate.show(self.path)}")
        if self.remote_url is not None:
            _check_url(self.remote_url)
        if self.path is None and self.remote_url is None:
            raise ConfigError("cold_tier needs a path (local disk), a remote_url (shared server) or both")
        validate.number(self.max_gib, "cold_tier.max_gib", lo=0.0, lo_open=True, hi=2.0**40)
        validate.integer(self.io_threads, "cold_tier.io_threads", lo=1, hi=1025)
        validate.number(self.timeout_s, "cold_tier.timeout_s", lo=0.0, lo_open=True, hi=600.0)
        validate.number(self.retry_interval_s, "cold_tier.retry_interval_s", lo=0.0, hi=3600.0)
        validate.number(self.staging_mib, "cold_tier.staging_mib", lo=1.0, hi=2.0**20)
        if self.write_through is not None and not isinstance(self.write_through, bool):
            raise ConfigError(f"cold_tier.write_through must be a bool, got {validate.show(self.write_through)}")

    @property
    def publishes(self) -> bool:
        """Whether saved blocks are written to the remote tier at once (see ``write_through``)."""
        return self.remote_url is not None and self.write_through is not False

    @classmethod
    def from_dict(cls, raw: object) -> "ColdTierConfig":
        """Parse the ``cold_tier`` entry of the connector's extra config (unknown keys rejected by name)."""
        if not isinstance(raw, dict):
            raise ConfigError(
                f"cold_tier must be a dict like {{'path': '/mnt/kv'}} or {{'remote_url': 'redis://host:6379'}}, "
                f"got {validate.show(raw)}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown cold_tier key(s) {unknown}; known: {sorted(known)}")
        return cls(**raw)

    def capacity_blocks(self, spec: KVSpec) -> int:
        """Blocks of ``spec`` that fit in the disk budget (0 without a disk)."""
        return int(self.max_gib * 2**30) // spec.bytes_per_block if self.path is not None else 0


def _check_url(url: object) -> None:
    if not isinstance(url, str) or not url:
        raise ConfigError(f"cold_tier.remote_url must be a URL string like 'redis://127.0.0.1:6379', got {validate.show(url)}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"cold_tier.remote_url {url!r} is not a valid URL: {e}") from None
    if parts.scheme not in REMOTE_SCHEMES:
        raise ConfigError(
            f"cold_tier.remote_url {url!r}: scheme {parts.scheme!r} is not a Redis-protocol server; "
            f"use one of {[s + '://' for s in REMOTE_SCHEMES]}"
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"cold_tier.remote_url {url!r} names no host")
    if parts.scheme == "unix" and not parts.path:
        raise ConfigError(f"cold_tier.remote_url {url!r} names no socket path")
    if port == 0:
        raise ConfigError(f"cold_tier.remote_url {url!r}: port 0 is not a server port")
