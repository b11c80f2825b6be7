"""kvstore inside vLLM (0.32): a KV connector with a host-memory tier, and CachePolicy adapters.

**KVStoreConnector** puts kvstore's host tier (a :class:`~kvstore.blocks.BlockPool` in pinned
CPU memory, managed by a kvstore eviction policy, "asym" by default) beneath vLLM's GPU prefix
cache, with an optional LMCache cold tier below it::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVStoreConnector",
        "kv_connector_module_path": "kvstore.integrations.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"host_blocks": 4096, "policy": "asym"}}'

The connector runs as two objects in two processes, as vLLM requires:

* Scheduler side (:class:`HostTierIndex`): the truth of what the host tier holds. A host block
  holds ``block_size`` tokens (a multiple of vLLM's block size) and is keyed by vLLM's chained
  prefix hash of its last vLLM-size block, so a key names the whole prefix. A lookup walks a
  request's keys in order and stops at the first miss, without side effects. Slots are
  allocated here (a BlockPool on the ``meta`` device: bookkeeping without memory) and every
  copy is sent to the worker as explicit (host slot, sub-block, GPU block) triples.
* Worker side (:class:`HostTierWorker`): the storage (a BlockPool on the CPU) and the copies.
  Each step it (1) spills evicted slots to the cold tier, (2) fetches cold hits into their new
  slots, (3) starts whole-block saves of finished requests (reported through
  ``get_finished``), (4) loads hits into vLLM's GPU blocks layer by layer (``wait_for_layer_load``
  waits for one layer), and saves newly computed prompt blocks layer by layer as each layer's
  forward finishes (``save_kv_layer``; ``wait_for_save`` completes them). Copies are
  :class:`~kvstore.transfer.StreamOp` s on one :class:`~kvstore.transfer.CopyStream` (a CUDA
  side stream; on CPU immediate, a layer's load inside its ``wait_for_layer_load``), each
  submitted after the compute stream's work so far. A load reads its host slots in stream
  order, so after every earlier save into them landed, though the scheduler publishes a slot
  when it plans the save; ``wait_for_save`` blocks until the step's saves (layer and
  finished-request) landed, so ``get_finished`` reports a request only once its slots hold its
  bytes, and spills and cold fetches, which touch the pool from the CPU, first synchronise the
  stream. One stream orders every copy after the ones of earlier steps, which is what makes
  reusing a slot in a later step safe.

Layout. In vLLM 0.32 every attention layer's cache is a ``[num_blocks, H, N, C]`` view
(logical order; any physical stride order, padding or kernel-block split) with K and V packed
in the content dim ``C = 2 * head_size``. A host slot holds ``[L, 2, block_size, H, D]`` (kvstore's
block layout): element ``[l, kv, j * N + n, h, d]`` of host block ``b`` is element
``[h, n, kv * D + d]`` of layer ``l``'s page of the ``j``-th GPU block of ``b``. The map is a
bijection, so a save then load is bit-exact whatever the backend means by C (the GPU backends
pack K|V per token as above; the CPU backend reads the page as ``[H, 2, N, D]``: the bytes
round-trip unchanged either way).

Failure: a load whose host copy is gone (its slot was lost or overwritten, or its cold copy
was evicted by LMCache) does not raise: its GPU blocks are reported by
``get_block_ids_with_load_errors`` (vLLM's ``kv_load_failure_policy`` then recomputes) and the
lost slots go back to the scheduler in the worker metadata, which forgets them.

**CachePolicy adapters** expose every online kvstore eviction policy to vLLM's own
OffloadingConnector: ``"eviction_policy": "kvstore_asym", "cache_policy_module_path":
"kvstore.integrations.vllm"`` (any registered name after ``kvstore_``).

Files: ``config`` (the extra config), ``metadata`` (what the two sides send each other),
``scheduler`` (the host tier's index and planning), ``worker`` (storage and copies),
``connector`` (the KVConnectorBase_V1 class), ``cache_policy`` (the CachePolicy adapters).
"""

from kvstore.integrations.vllm.cache_policy import KVStoreCachePolicy, cache_policy_class
from kvstore.integrations.vllm.config import KVStoreConnectorConfig
from kvstore.integrations.vllm.connector import KVStoreConnector
from kvstore.integrations.vllm.metadata import BlockCopy, KVStoreConnectorMetadata, KVStoreWorkerMetadata
from kvstore.integrations.vllm.scheduler import HostTierIndex, _SchedulerSide
from kvstore.integrations.vllm.worker import HostTierWorker

__all__ = [
    "KVStoreConnector",
    "KVStoreConnectorConfig",
    "KVStoreConnectorMetadata",
    "KVStoreWorkerMetadata",
    "BlockCopy",
    "HostTierIndex",
    "HostTierWorker",
    "KVStoreCachePolicy",
    "cache_policy_class",
]


def __getattr__(name: str) -> type[KVStoreCachePolicy]:
    """``kvstore_<policy>``: what vLLM's CachePolicyFactory resolves through ``cache_policy_module_path``."""
    if name.startswith("kvstore_"):
        return cache_policy_class(name[len("kvstore_") :])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
