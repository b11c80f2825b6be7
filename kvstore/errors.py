"""kvstore's exception hierarchy.

Every error says what was wrong and carries the numbers. Each class also derives from the
builtin a caller would naturally catch (ValueError, LookupError, RuntimeError), so generic
handlers keep working. An operation that raises leaves the store exactly as it was.
"""

from __future__ import annotations


class KVStoreError(Exception):
    """Base class of every error kvstore raises on purpose."""


class ConfigError(KVStoreError, ValueError):
    """A configuration value is out of range or inconsistent (raised at construction)."""


class ShapeError(KVStoreError, ValueError):
    """A tensor has the wrong shape, dtype, device or stride for the call it was passed to, or
    requires grad (K/V and recomputed blocks are refused, not detached); also ids or positions
    of a non-integer type (floats and bools are never truncated; see kvstore.validate)."""


class NonFiniteError(KVStoreError, ValueError):
    """K/V (or keys for an index) contain NaN or Inf and the store was not told to allow them."""


class UnknownSequenceError(KVStoreError, LookupError):
    """A sequence id that was never created, or was already freed."""

    def __str__(self) -> str:  # LookupError's default str() adds quotes; keep the message readable
        return str(self.args[0]) if self.args else ""


class OutOfRangeError(KVStoreError, IndexError):
    """A block id, slot or token position outside the range that exists."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class BlockStateError(KVStoreError, LookupError):
    """A block freed twice, or asked for in a state it is not in (e.g. a load whose host
    copy is gone)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CapacityError(KVStoreError, RuntimeError):
    """A tier has too few free blocks and nothing in it can be evicted."""


class IndexStateError(KVStoreError, RuntimeError):
    """A PQ index used out of order (e.g. search before train)."""


class TraceFormatError(KVStoreError, ValueError):
    """A request-trace line could not be parsed; the message names the file and line number."""


class KernelError(KVStoreError, RuntimeError):
    """A CUDA kernel could not be compiled, loaded or launched."""


class PolicyError(KVStoreError, RuntimeError):
    """An eviction policy broke its contract (named a duplicate, protected or unknown victim,
    or too few), or was given to a second owner; the message names the policy and the id."""


class RecomputeError(KVStoreError, RuntimeError):
    """The store's recompute callable raised; the message names the block's sequence and tokens,
    the original exception is its ``__cause__``, and the store is as it was before the call."""
