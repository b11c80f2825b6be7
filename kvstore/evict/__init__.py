"""Eviction policies, the cost model and the trace-replay simulator.

Importing this package registers the built-in policies in :data:`POLICIES`.
"""

from kvstore.evict.base import POLICIES, BlockInfo, EvictionPolicy, make_policy, register_policy
from kvstore.evict import lru  # noqa: F401  (registers "lru")

__all__ = ["POLICIES", "BlockInfo", "EvictionPolicy", "make_policy", "register_policy"]
