"""GDSF: Greedy-Dual-Size-Frequency, cost per byte with frequency and aging."""

from __future__ import annotations

import numpy as np

from kvstore.errors import ConfigError
from kvstore.evict.base import register_policy
from kvstore.evict.priority import GreedyDual


@register_policy("gdsf")
class GDSF(GreedyDual):
    """Greedy-Dual-Size-Frequency (Cherkasova 1998): priority ``L + freq * cost / size``.

    ``cost`` is the block's recompute FLOPs, ``size`` its bytes and ``freq`` its reads since it
    entered a tier (``info.access_count``). ``L``, the aging clock, is the largest priority
    removed so far, so blocks not read for a while fall below newly scored ones however
    valuable they once were.
    """

    def __init__(self, info=None) -> None:
        if info is None:
            raise ConfigError("gdsf needs a BlockInfo (it reads recompute_cost, size_bytes and access_count)")
        super().__init__(info)

    def priority(self, blocks: np.ndarray, hit: bool) -> np.ndarray:
        info = self.info
        per_byte = info.recompute_cost[blocks] / np.maximum(info.size_bytes[blocks], 1)
        return self.clock + info.access_count[blocks] * per_byte
