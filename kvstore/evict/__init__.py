"""Eviction policies, the cost model and the trace-replay simulator.

Importing this package registers the built-in policies in :data:`POLICIES`.
"""

from kvstore.evict.base import POLICIES, BlockInfo, EvictionPolicy, OfflinePolicy, make_policy, register_policy
from kvstore.evict import arc, asym, belady, belady_cost, fifo, gdsf, lfu, lru, s3fifo  # noqa: F401  (register)

__all__ = ["POLICIES", "BlockInfo", "EvictionPolicy", "OfflinePolicy", "make_policy", "register_policy"]
