"""Negative control for the engine tests: KVStoreConnector that adds seeded noise to every GPU
block it has just loaded from the host tier (after each layer's load), so an engine that really
reads the loaded KV must change its output. Loaded by the engine through
``kv_connector_module_path: corrupting_connector`` (this folder on the subprocess's path)."""

from __future__ import annotations

import torch

from kvstore.integrations.vllm import KVStoreConnector


class CorruptingConnector(KVStoreConnector):
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        super().register_kv_caches(kv_caches)
        self._caches = kv_caches
        self._noise = torch.Generator().manual_seed(1234)

    def wait_for_layer_load(self, layer_name: str) -> None:
        super().wait_for_layer_load(layer_name)
        loads = self._get_connector_metadata().loads
        blocks = sorted({int(b) for copy in loads.values() for b in copy.gpu_blocks})
        if not blocks or layer_name not in self._caches:
            return
        pages = self._caches[layer_name].unflatten(0, (self._num_gpu_blocks, -1))
        idx = torch.tensor(blocks)
        pages[idx] += torch.randn(pages[idx].shape, generator=self._noise, dtype=pages.dtype)
