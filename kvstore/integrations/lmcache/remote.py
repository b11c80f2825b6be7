"""Remote cold tier: blocks in a Redis-protocol server shared by several engines, through LMCache.

Every engine pointed at the same server (``cold_tier.remote_url``) finds the blocks the
others stored: the key is LMCache's ``CacheEngineKey`` of the block's vLLM prefix hash,
which is the same in every process (vLLM seeds it with a fixed value unless
``PYTHONHASHSEED`` says otherwise), namespaced by model, layout and tensor-parallel rank.
The client is LMCache's own ``RedisConnector`` (redis-py's asyncio client, created by
``CreateConnector``), on the tier's event loop thread.

What a remote server adds over a local disk is failure, so each call is bounded:

- **Timeouts.** Connecting and every socket read or write time out after
  ``cold_tier.timeout_s`` (redis-py's ``socket_connect_timeout``/``socket_timeout``, added to
  the URL unless it sets them), and each call waits at most that long for its reply. A
  step's reads run concurrently under one deadline, so a step never waits longer than one
  timeout for the server.
- **Outages.** A refused connection or a timeout marks the server down for
  ``retry_interval_s``: meanwhile lookups find nothing, reads fail at once and writes are
  dropped, so a dead server costs one timeout per interval, not one per block. The next call
  after the interval tries again (redis-py reconnects), so the tier recovers by itself.
- **Damaged values.** A value is the block with a header (:mod:`.codec`: model/layout digest,
  key, length, CRC-32). A value that fails any check, or that LMCache cannot even parse
  (truncated, foreign metadata), is a failed read: the caller reports the block as a load
  error and vLLM recomputes it. Wrong KV is never returned.
- **Memory.** Writes are asynchronous and staged in a bounded CPU pool; when a slow server
  lets it fill up, further writes are dropped (counted), never queued without bound.

A failed read is never an exception for the caller: :meth:`get_many` says which blocks it
read, and :attr:`stats` counts what happened.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import torch

from kvstore.errors import ShapeError
from kvstore.integrations.lmcache.codec import BlockCodec, CorruptBlockError
from kvstore.integrations.lmcache.config import ColdTierConfig
from kvstore.integrations.lmcache.runtime import LMCacheRuntime
from kvstore.spec import KVSpec

__all__ = ["LMCacheRemoteTier", "RemoteStats"]

log = logging.getLogger(__name__)

# How many recently written keys a tier remembers so that a block published at save time is
# not sent again when it later leaves the host tier. A set of 2**16 32-byte keys is ~6 MB;
# forgetting a key costs one redundant write, never a wrong read.
_RECENT_KEYS = 1 << 16


@dataclass
class RemoteStats:
    """What the remote tier did (counts since it was built)."""

    puts: int = 0
    put_bytes: int = 0
    dropped_puts: int = 0  # not sent: server down or staging full
    failed_puts: int = 0  # sent, the server did not take it
    lookups: int = 0
    reads: int = 0
    hits: int = 0
    misses: int = 0
    corrupt: int = 0  # failed a header/checksum check or could not be parsed
    timeouts: int = 0
    outages: int = 0  # times the server was marked down

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _is_outage(exc: BaseException) -> bool:
    """A server or network failure (as opposed to a damaged value)."""
    import redis.exceptions as rex

    return isinstance(exc, (rex.ConnectionError, rex.TimeoutError, OSError, TimeoutError, asyncio.TimeoutError,
                            concurrent.futures.TimeoutError))


def with_timeouts(url: str, timeout_s: float) -> str:
    """``url`` with redis-py's connect and socket timeouts set to ``timeout_s`` unless it sets them."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.setdefault("socket_timeout", f"{timeout_s:g}")
    query.setdefault("socket_connect_timeout", f"{timeout_s:g}")
    return urlunsplit(parts._replace(query=urlencode(query)))


class LMCacheRemoteTier:
    """kvstore blocks in a Redis-protocol server, through LMCache's RedisConnector.

    Args:
        config: ``remote_url``, timeouts and staging (``path`` is not used here).
        spec: block shape and dtype of what is stored.
        model_name, world_size, worker_id: key namespace (one per tensor-parallel rank); the
            model name is also in every value's layout digest.
        staging: False for a lookup-only tier (the scheduler's): no read or write buffers.

    Thread-safe: the connector runs on the tier's own loop thread; the little state kept here
    is guarded by a lock.
    """

    def __init__(
        self, config: ColdTierConfig, spec: KVSpec, *, model_name: str = "kvstore", world_size: int = 1,
        worker_id: int = 0, staging: bool = True,
    ) -> None:
        from lmcache.utils import CacheEngineKey
        from lmcache.v1.storage_backend.connector import CreateConnector

        if config.remote_url is None:
            raise ValueError("LMCacheRemoteTier needs cold_tier.remote_url")
        self.config = config
        self.spec = spec
        self.codec = BlockCodec(spec, model_name)
        self.timeout = float(config.timeout_s)
        self.stats = RemoteStats()
        staging_bytes = max(int(config.staging_mib * 2**20), 4 * self.codec.nbytes) if staging else 2 * self.codec.nbytes
        url = with_timeouts(config.remote_url, self.timeout)
        self._rt = LMCacheRuntime(
            spec, model_name=model_name, world_size=world_size, worker_id=worker_id,
            staging_bytes=staging_bytes, buffer_bytes=self.codec.nbytes,
            remote_url=url, remote_serde="naive", extra_config={"save_chunk_meta": False},
        )
        self._conn = CreateConnector(url, self._rt.loop, self._rt.cpu, self._rt.config, self._rt.metadata)
        self._key_cls = CacheEngineKey
        self._namespace = (f"kvstore/{model_name}/{self.codec.layout.hex()[:16]}", world_size, worker_id)
        self._lock = threading.Lock()
        self._inflight: set[concurrent.futures.Future] = set()
        self._recent: OrderedDict[int, None] = OrderedDict()
        self._down_until = 0.0
        self._closed = False

    # ------------------------------------------------------------------ health
    @property
    def available(self) -> bool:
        """False while the server is marked down (see the module docstring)."""
        return not self._closed and time.monotonic() >= self._down_until

    def _failed(self, exc: BaseException, what: str) -> None:
        """Record a server failure: mark it down for ``retry_interval_s``."""
        with self._lock:
            if isinstance(exc, (TimeoutError, asyncio.TimeoutError, concurrent.futures.TimeoutError)) or "Timeout" in type(exc).__name__:
                self.stats.timeouts += 1
            was_up = time.monotonic() >= self._down_until
            self._down_until = time.monotonic() + self.config.retry_interval_s
            if was_up:
                self.stats.outages += 1
                self._recent.clear()  # the server may come back empty: write again what it lost
        if was_up:
            log.warning("kvstore remote tier %s: %s failed (%s: %s); treating it as empty for %.3g s",
                        self.config.remote_url, what, type(exc).__name__, exc, self.config.retry_interval_s)

    def _key(self, key: int):
        model_name, world_size, worker_id = self._namespace
        return self._key_cls(model_name=model_name, world_size=world_size, worker_id=worker_id, chunk_hash=key, dtype=self.spec.dtype)

    def _wait(self, coro, what: str):
        """Run ``coro`` on the loop and wait at most one timeout; ``(ok, result)``."""
        fut = self._rt.submit(coro)
        try:
            return True, fut.result(self.timeout)
        except Exception as e:  # noqa: BLE001 - every failure of a best-effort tier is a miss
            if _is_outage(e):
                self._failed(e, what)
            else:
                log.warning("kvstore remote tier: %s failed: %s: %s", what, type(e).__name__, e)
            return False, None

    # ------------------------------------------------------------------ lookups
    def count_leading(self, keys: Sequence[int]) -> int:
        """How many of ``keys``, from the first, the server holds (0 while it is down)."""
        if not keys or not self.available:
            return 0
        self.stats.lookups += 1
        conn, cks = self._conn, [self._key(k) for k in keys]

        async def exists_all() -> list[bool]:
            return await asyncio.gather(*(conn.exists(k) for k in cks))

        ok, found = self._wait(exists_all(), "lookup")
        if not ok:
            return 0
        n = 0
        for f in found:
            if not f:
                break
            n += 1
        return n

    def contains(self, key: int) -> bool:
        """Whether the server holds ``key``."""
        return self.count_leading([key]) == 1

    # ------------------------------------------------------------------ writes
    def _check_block(self, block: torch.Tensor, what: str) -> None:
        if tuple(block.shape) != self.spec.block_shape or block.dtype != self.spec.dtype or block.device.type != "cpu":
            raise ShapeError(
                f"remote tier {what}: block must be a CPU {self.spec.dtype} tensor of shape {self.spec.block_shape}, "
                f"got {block.dtype} {tuple(block.shape)} on {block.device}"
            )

    def put(self, key: int, block: torch.Tensor) -> bool:
        """Encode ``block: [L, 2, block_size, Hkv, D]`` (CPU) and write it asynchronously.

        The block is copied before returning. Returns False when the write is dropped (server
        down, or the staging pool full of writes still in flight).
        """
        self._check_block(block, "put")
        with self._lock:
            if key in self._recent:
                self._recent.move_to_end(key)
                return True
        if not self.available:
            self.stats.dropped_puts += 1
            return False
        from lmcache.v1.memory_management import MemoryFormat

        obj = self._rt.cpu.allocate(torch.Size([self.codec.nbytes]), torch.uint8, MemoryFormat.KV_2LTD)
        if obj is None:
            self.stats.dropped_puts += 1
            return False
        self.codec.encode(key, block, obj.tensor)
        fut = self._rt.submit(self._conn.put(self._key(key), obj))  # the connector frees obj when done
        with self._lock:
            self._inflight.add(fut)
            self._recent[key] = None
            while len(self._recent) > _RECENT_KEYS:
                self._recent.popitem(last=False)
        self.stats.puts += 1
        self.stats.put_bytes += self.codec.nbytes
        fut.add_done_callback(lambda f, key=key: self._put_done(f, key))
        return True

    def _put_done(self, fut: concurrent.futures.Future, key: int) -> None:
        with self._lock:
            self._inflight.discard(fut)
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None or fut.cancelled():
            self.stats.failed_puts += 1
            with self._lock:
                self._recent.pop(key, None)
            if exc is not None and _is_outage(exc):
                self._failed(exc, "write")

    def publish(self, key: int, block: torch.Tensor) -> bool:
        """Write-through of a block the host tier just saved (when ``config.publishes``)."""
        return self.put(key, block) if self.config.publishes else False

    # ------------------------------------------------------------------ reads
    def get_many(self, keys: Sequence[int], outs: Sequence[torch.Tensor]) -> list[bool]:
        """Read blocks ``keys`` into ``outs`` (each ``[L, 2, block_size, Hkv, D]``, CPU), all
        concurrently, waiting at most one timeout in all. ``[i]`` is True when ``outs[i]``
        holds block ``keys[i]``, checked; a False entry's ``outs[i]`` is untouched."""
        if len(keys) != len(outs):
            raise ShapeError(f"remote tier get_many: {len(keys)} keys but {len(outs)} output blocks")
        for out in outs:
            self._check_block(out, "get")
        got = [False] * len(keys)
        if not keys or not self.available:
            return got
        self.stats.reads += len(keys)
        conn, cks = self._conn, [self._key(k) for k in keys]

        async def read_all():
            return await asyncio.gather(*(conn.get(k) for k in cks), return_exceptions=True)

        fut = self._rt.submit(read_all())
        try:
            results = fut.result(self.timeout)
        except Exception as e:  # noqa: BLE001
            # Late replies still hold staging buffers: free them when they arrive.
            fut.add_done_callback(_free_late)
            self._failed(e, f"read of {len(keys)} blocks")
            return got
        for i, (key, res, out) in enumerate(zip(keys, results, outs)):
            if isinstance(res, BaseException):
                if _is_outage(res):
                    self._failed(res, "read")
                else:  # LMCache could not parse the stored value (truncated, foreign metadata)
                    self._corrupt(key, f"block {key:#x} unreadable ({type(res).__name__}: {res})")
                continue
            if res is None:
                self.stats.misses += 1
                continue
            try:
                self.codec.decode(key, res.tensor.reshape(-1).view(torch.uint8), out)
                got[i] = True
                self.stats.hits += 1
            except CorruptBlockError as e:
                self._corrupt(key, str(e))
            finally:
                res.ref_count_down()
        return got

    def _corrupt(self, key: int, why: str) -> None:
        """A damaged value: counted, and forgotten as written so that the next write of the block replaces it."""
        with self._lock:
            self.stats.corrupt += 1
            self._recent.pop(key, None)
        log.warning("kvstore remote tier: %s", why)

    def get(self, key: int, out: torch.Tensor) -> bool:
        """Read block ``key`` into ``out``; False when it is missing, damaged or the server failed."""
        return self.get_many([key], [out])[0]

    # ------------------------------------------------------------------ lifecycle
    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every write issued so far is answered (TimeoutError after ``timeout`` s)."""
        with self._lock:
            waiting = list(self._inflight)
        _, pending = concurrent.futures.wait(waiting, timeout=timeout)
        if pending:
            raise TimeoutError(f"remote tier: {len(pending)} writes still pending after {timeout} s")

    def close(self) -> None:
        """Finish pending writes (at most one timeout while the server is down) and close the connection."""
        if self._closed:
            return
        try:
            self.flush(timeout=30.0 if self.available else self.timeout)
        except TimeoutError as e:
            log.warning("kvstore remote tier: closing with writes unanswered: %s", e)
        finally:
            self._closed = True
            try:
                self._rt.submit(self._close_connection()).result(self.timeout)
            except Exception as e:  # noqa: BLE001 - closing a dead connection
                log.debug("kvstore remote tier: close: %s", e)
            self._rt.stop()

    async def _close_connection(self) -> None:
        """Stop the connector's job queue and close its redis client.

        Not ``RedisConnector.close()``: in LMCache 0.5.6 it awaits the synchronous
        ``AsyncPQExecutor.shutdown``, which blocks the loop thread on a future of that same
        loop (a deadlock). Its parts are closed here the way it means to, on the loop.
        """
        inner = getattr(self._conn, "_connector", self._conn)
        pq, client = getattr(inner, "pq_executor", None), getattr(inner, "connection", None)
        if pq is None or client is None:  # another LMCache layout: trust its own close
            await self._conn.close()
            return
        await pq.shutdown_async(wait=False)
        await client.aclose()


def _free_late(fut: concurrent.futures.Future) -> None:
    if fut.cancelled() or fut.exception() is not None:
        return
    for res in fut.result():
        if res is not None and not isinstance(res, BaseException):
            res.ref_count_down()
