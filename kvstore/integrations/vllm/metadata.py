"""What the two sides of the connector send each other: copy lists and per-step metadata."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata


@dataclass
class BlockCopy:
    """Copies between vLLM GPU blocks and host slots, one entry per GPU block.

    Arrays (all ``[n]`` int64): ``slots`` host slot, ``subs`` which GPU-size piece of the host
    block, ``gpu_blocks`` vLLM block id. ``keys[i]`` is the key of the host block (checked on
    load: a slot whose key differs lost its content).
    """

    slots: np.ndarray
    subs: np.ndarray
    gpu_blocks: np.ndarray
    keys: list[bytes]

    @classmethod
    def build(cls, slots: Sequence[int] | np.ndarray, keys: Sequence[bytes], gpu_blocks: Sequence[int], first_sub: int, per_host: int) -> "BlockCopy":
        """GPU blocks ``gpu_blocks`` hold consecutive pieces of the host blocks ``slots``,
        starting at piece ``first_sub`` of ``slots[0]``; ``per_host`` pieces per host block."""
        n = len(gpu_blocks)
        if per_host == 1:  # one GPU block per host block (vLLM's block size): no pieces to map
            return cls(np.array(slots[:n], dtype=np.int64), np.zeros(n, dtype=np.int64), np.array(gpu_blocks, dtype=np.int64), list(keys[:n]))
        piece = first_sub + np.arange(n, dtype=np.int64)
        host_idx = piece // per_host
        slot_arr = np.asarray(slots, dtype=np.int64)[host_idx]
        return cls(slot_arr, piece % per_host, np.asarray(gpu_blocks, dtype=np.int64), [keys[i] for i in host_idx.tolist()])

    def __len__(self) -> int:
        return int(self.gpu_blocks.size)

    @staticmethod
    def concat(copies: Sequence["BlockCopy"]) -> "BlockCopy":
        if not copies:
            e = np.empty(0, dtype=np.int64)
            return BlockCopy(e, e, e, [])
        return BlockCopy(
            np.concatenate([c.slots for c in copies]),
            np.concatenate([c.subs for c in copies]),
            np.concatenate([c.gpu_blocks for c in copies]),
            [k for c in copies for k in c.keys],
        )


@dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker, one step. Applied in field order (see the module docstring)."""

    spills: list[tuple[int, bytes]] = field(default_factory=list)
    fetches: list[tuple[int, bytes]] = field(default_factory=list)
    finished_saves: dict[str, BlockCopy] = field(default_factory=dict)
    loads: dict[str, BlockCopy] = field(default_factory=dict)
    saves: BlockCopy = field(default_factory=lambda: BlockCopy.concat([]))


@dataclass
class KVStoreWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler: host slots whose content was found lost (the scheduler forgets them)."""

    lost_slots: set[int] = field(default_factory=set)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, KVStoreWorkerMetadata)
        return KVStoreWorkerMetadata(self.lost_slots | other.lost_slots)
