"""The vLLM V1 KV connector: one class that routes vLLM's calls to the scheduler or the worker side."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvstore.integrations.vllm.config import KVStoreConnectorConfig, _cost_model, _host_spec
from kvstore.integrations.vllm.metadata import KVStoreConnectorMetadata, KVStoreWorkerMetadata
from kvstore.integrations.vllm.scheduler import _SchedulerSide
from kvstore.integrations.vllm.worker import HostTierWorker

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


class KVStoreConnector(KVConnectorBase_V1):
    """vLLM V1 KV connector backed by kvstore's host tier (see the module docstring)."""

    _cache_hit_source = CacheHitSource.HOST if hasattr(CacheHitSource, "HOST") else CacheHitSource.EXTERNAL_UNSPECIFIED

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig") -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.config = KVStoreConnectorConfig.from_extra_config(self._kv_transfer_config.kv_connector_extra_config)
        spec, gpu_block, layer_names = _host_spec(vllm_config, kv_cache_config, self.config.block_size)
        self.spec = spec
        self.scheduler: _SchedulerSide | None = None
        self.worker: HostTierWorker | None = None
        model_name, pc = str(vllm_config.model_config.model), vllm_config.parallel_config
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler = _SchedulerSide(
                self.config, spec, gpu_block, _cost_model(vllm_config, spec), model_name=model_name, world_size=pc.world_size,
            )
        else:
            cold = None
            if self.config.cold_tier is not None:
                from kvstore.integrations.lmcache import open_cold_tier

                cold = open_cold_tier(self.config.cold_tier, spec, model_name=model_name, world_size=pc.world_size, worker_id=pc.rank)
            self.worker = HostTierWorker(
                spec, self.config.host_blocks, gpu_block, layer_names, pin_memory=self.config.pin_memory, cold=cold
            )
        self._num_gpu_blocks = kv_cache_config.num_blocks

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is a future miss

    # ------------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register(kv_caches, self._num_gpu_blocks)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVStoreConnectorMetadata)
        self.worker.start(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker.wait_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: "AttentionMetadata", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVStoreConnectorMetadata)
        self.worker.save_layer(layer_name, meta.saves)

    def wait_for_save(self) -> None:
        self.worker.finish_step()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self.worker.finished_sending() or None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_failed_blocks()

    def build_connector_worker_meta(self) -> KVStoreWorkerMetadata | None:
        if self.worker is None:
            return None
        lost = self.worker.take_lost_slots()
        return KVStoreWorkerMetadata(lost) if lost else None

    def shutdown(self) -> None:
        if self.worker is not None and self.worker.cold is not None:
            self.worker.cold.close()
        if self.scheduler is not None:
            self.scheduler.index.cold.close()

    # ------------------------------------------------------------------ scheduler side
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request, block_ids)

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        self.scheduler.update_connector_output(connector_output)

    def reset_cache(self) -> bool:
        idx = self.scheduler.index
        idx.remove(range(idx.pool.num_slots))
        idx.cold.clear()
        return True
