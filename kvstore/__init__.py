"""kvstore: tiered, paged KV-cache management for long-context LLM inference."""

from kvstore.errors import (
    BlockStateError,
    CapacityError,
    ConfigError,
    KVStoreError,
    NonFiniteError,
    OutOfRangeError,
    PolicyError,
    RecomputeError,
    ShapeError,
    UnknownSequenceError,
)

__version__ = "0.1.0"

__all__ = [
    "KVSpec",
    "ModelCost",
    "KVStoreError",
    "ConfigError",
    "ShapeError",
    "NonFiniteError",
    "UnknownSequenceError",
    "OutOfRangeError",
    "BlockStateError",
    "CapacityError",
    "PolicyError",
    "RecomputeError",
]


def __getattr__(name: str):
    """``KVSpec`` and ``ModelCost`` (kvstore/spec.py, which imports torch) on first use, so that
    ``import kvstore.cli`` for ``kvstore --help`` does not import torch."""
    if name in ("KVSpec", "ModelCost"):
        from kvstore import spec

        return getattr(spec, name)
    raise AttributeError(f"module 'kvstore' has no attribute {name!r}")
