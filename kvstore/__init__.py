"""kvstore: tiered, paged KV-cache management for long-context LLM inference."""

from kvstore.errors import (
    BlockStateError,
    CapacityError,
    ConfigError,
    KVStoreError,
    NonFiniteError,
    OutOfRangeError,
    ShapeError,
    UnknownSequenceError,
)
from kvstore.spec import KVSpec, ModelCost

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
]
