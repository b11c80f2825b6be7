"""Worker side: the host tier's storage and the copies between it, vLLM's KV caches and the cold tier."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvstore.blocks import BlockPool
from kvstore.errors import ShapeError
from kvstore.integrations.lmcache import cold_key
from kvstore.integrations.vllm.metadata import BlockCopy, KVStoreConnectorMetadata
from kvstore.spec import KVSpec
from kvstore.transfer import CopyStream, CudaCopyStream, ImmediateStream, StreamOp


def copy_stream(device: torch.device) -> CopyStream:
    """Where the worker's copies run: a CUDA side stream on CUDA, else immediate (tests swap in a late stream)."""
    return CudaCopyStream(device) if device.type == "cuda" else ImmediateStream()


@dataclass
class _Layer:
    """One attention layer's cache as ``[num_blocks, r, H, Nk, 2, D]`` (a view; r kernel blocks per block)."""

    name: str
    cache: torch.Tensor


class HostTierWorker:
    """Host tier storage and the copies between it, vLLM's KV caches and the cold tier.

    Args:
        spec: host block shape.
        num_slots: host tier capacity in blocks.
        gpu_block: vLLM's block size (tokens); ``spec.block_size`` is a multiple of it.
        layer_names: attention layers in host order (``spec.num_layers`` names).
        pin_memory: page-lock the host pool (default: when CUDA is available).
        cold: the cold tier, or None.

    Public copy methods take a lock, so saves and loads from several threads are safe.
    """

    def __init__(
        self,
        spec: KVSpec,
        num_slots: int,
        gpu_block: int,
        layer_names: Sequence[str],
        *,
        pin_memory: bool | None = None,
        cold=None,
    ) -> None:
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.spec = spec
        self.per_host = spec.block_size // gpu_block
        self.gpu_block = gpu_block
        self.pool = BlockPool(spec, num_slots, device="cpu", pin_memory=pin, name="host")
        self.layer_names = list(layer_names)
        self.layers: list[_Layer] = []
        self.cold = cold
        self.slot_key: list[bytes | None] = [None] * num_slots
        self.lost_slots: set[int] = set()
        self.failed_blocks: set[int] = set()
        self._lock = threading.RLock()
        self.device: torch.device | None = None
        self.stream: CopyStream = ImmediateStream()
        # per-step state
        self._loads: BlockCopy | None = None
        self._loaded: list[bool] = []
        self._load_events: list = []
        self._pending_saves: list = []  # events of this step's layer saves
        self._finished: dict[str, object | None] = {}  # request -> event of its finished-request save
        self._to_publish: list[BlockCopy] = []  # this step's saves, written through once they landed

    # ------------------------------------------------------------------ registration
    def register(self, kv_caches: Mapping[str, torch.Tensor], num_gpu_blocks: int) -> None:
        """Take vLLM's per-layer caches ``[num_blocks * r, H, Nk, 2 * D]`` (any strides)."""
        s = self.spec
        missing = [n for n in self.layer_names if n not in kv_caches]
        if missing:
            raise ShapeError(f"register_kv_caches: no KV cache for layers {missing[:4]} (got {list(kv_caches)[:4]}...)")
        layers = []
        for name in self.layer_names:
            t = kv_caches[name]
            if t.dim() != 4 or t.shape[0] % num_gpu_blocks or t.dtype != s.dtype:
                raise ShapeError(
                    f"layer {name}: expected a [num_blocks*r, H, N, C] {s.dtype} cache with num_blocks={num_gpu_blocks}, "
                    f"got {t.dtype} {tuple(t.shape)}"
                )
            r = t.shape[0] // num_gpu_blocks
            if t.shape[1] != s.num_kv_heads or t.shape[2] * r != self.gpu_block or t.shape[3] != 2 * s.head_dim:
                raise ShapeError(
                    f"layer {name}: page {tuple(t.shape[1:])} x {r} kernel blocks does not hold {self.gpu_block} tokens "
                    f"of {s.num_kv_heads} heads x 2*{s.head_dim}"
                )
            layers.append(_Layer(name, t.unflatten(0, (num_gpu_blocks, r)).unflatten(-1, (2, s.head_dim))))
        self.layers = layers
        self._index = {ly.name: i for i, ly in enumerate(layers)}
        self.device = layers[0].cache.device
        self.stream = copy_stream(self.device)

    # ------------------------------------------------------------------ element maps
    def _host_view(self, layer: int) -> torch.Tensor:
        """Host layer ``l`` as ``[slots, 2, per_host, r, Nk, H, D]`` (a view of the pool)."""
        s, r = self.spec, self.layers[layer].cache.shape[1]
        nk = self.gpu_block // r
        return self.pool.kv[:, layer].view(self.pool.num_slots, 2, self.per_host, r, nk, s.num_kv_heads, s.head_dim)

    def _gather_gpu(self, layer: int, gpu_blocks: torch.Tensor) -> torch.Tensor:
        """Pages of ``gpu_blocks`` in host order ``[n, 2, r, Nk, H, D]`` (a new tensor on the cache's device)."""
        return self.layers[layer].cache[gpu_blocks].permute(0, 4, 1, 3, 2, 5)

    def _scatter_gpu(self, layer: int, gpu_blocks: torch.Tensor, src: torch.Tensor) -> None:
        """Write ``src: [n, 2, r, Nk, H, D]`` into the pages of ``gpu_blocks``."""
        self.layers[layer].cache[gpu_blocks] = src.permute(0, 2, 4, 3, 1, 5)

    # ------------------------------------------------------------------ step entry points
    def start(self, meta: KVStoreConnectorMetadata) -> None:
        """Apply a step's spills, fetches and finished-request saves, and start its loads."""
        with self._lock:
            if meta.spills or meta.fetches:
                self._sync()
                self._spill(meta.spills)
                self._fetch(meta.fetches)
            for req_id, copy in meta.finished_saves.items():
                self._finished[req_id] = self._save_layers(copy, range(len(self.layers)))
            if self.cold is not None:  # published once they landed (finish_step)
                self._to_publish = [c for c in (meta.saves, *meta.finished_saves.values()) if len(c)]
            loads = BlockCopy.concat(list(meta.loads.values()))
            self._loads = self._verified(loads) if len(loads) else None
            self._loaded = [False] * len(self.layers)
            self._load_events = [None] * len(self.layers)
            if self._loads is not None and self.stream.asynchronous:
                for layer in range(len(self.layers)):
                    self._load_events[layer] = self._load_layer(self._loads, layer)

    def wait_layer(self, name: str) -> None:
        """Make layer ``name``'s loads visible to the compute stream (immediate copies: run them now)."""
        i = self._index.get(name)
        if i is None or self._loads is None or self._loaded[i]:
            return
        with self._lock:
            if not self.stream.asynchronous:
                self._load_layer(self._loads, i)
            elif self._load_events[i] is not None:
                self._load_events[i].wait()
            self._loaded[i] = True

    def save_layer(self, name: str, saves: BlockCopy) -> None:
        """Start copying layer ``name`` of this step's new blocks to the host."""
        i = self._index.get(name)
        if i is None or not len(saves):
            return
        with self._lock:
            event = self._save_layers(saves, (i,))
            if event is not None:
                self._pending_saves.append(event)

    def finish_step(self) -> None:
        """Complete this step's saves (layer saves and finished-request saves: the host blocks until
        they landed, so a slot is reported saved only once it holds its bytes) and any loads no
        layer waited for."""
        with self._lock:
            if self._loads is not None:
                for i, done in enumerate(self._loaded):
                    if not done:
                        self.wait_layer(self.layers[i].name)
                self._loads = None
            for event in [*self._pending_saves, *self._finished.values()]:
                if event is not None:
                    event.synchronize()
            self._pending_saves.clear()
            self._publish()

    def finished_sending(self) -> set[str]:
        """Requests whose finished-request save has landed (all of them after :meth:`finish_step`)."""
        with self._lock:
            done = {r for r, ev in self._finished.items() if ev is None or ev.query()}
            for r in done:
                del self._finished[r]
            return done

    def take_failed_blocks(self) -> set[int]:
        with self._lock:
            out, self.failed_blocks = self.failed_blocks, set()
            return out

    def take_lost_slots(self) -> set[int]:
        with self._lock:
            out, self.lost_slots = self.lost_slots, set()
            return out

    # ------------------------------------------------------------------ direct copies (tests, tools)
    def save_blocks(self, copy: BlockCopy) -> None:
        """Copy GPU blocks into host slots, all layers, and wait for it."""
        with self._lock:
            event = self._save_layers(copy, range(len(self.layers)))
            if event is not None:
                event.synchronize()

    def load_blocks(self, copy: BlockCopy) -> set[int]:
        """Copy host slots into GPU blocks, all layers, and wait; returns the GPU blocks that failed."""
        with self._lock:
            ok = self._verified(copy)
            if ok is not None:
                for layer in range(len(self.layers)):
                    event = self._load_layer(ok, layer)
                    if event is not None:
                        event.synchronize()
            return self.take_failed_blocks()

    def drop(self, slots: Iterable[int]) -> None:
        """Invalidate host copies (their loads fail from now on)."""
        with self._lock:
            for s in slots:
                self.slot_key[s] = None

    # ------------------------------------------------------------------ internals
    def _sync(self) -> None:
        self.stream.synchronize()
        self._pending_saves.clear()

    def _spill(self, spills: Sequence[tuple[int, bytes]]) -> None:
        if self.cold is None:
            return
        for slot, key in spills:
            if self.slot_key[slot] == key:
                self.cold.put(cold_key(key), self.pool.kv[slot])

    def _fetch(self, fetches: Sequence[tuple[int, bytes]]) -> None:
        """Read the step's cold hits into their slots, all at once (a remote tier reads them
        concurrently under one timeout); a slot whose read failed holds nothing (its load fails)."""
        if not fetches:
            return
        slots = [s for s, _ in fetches]
        for s in slots:
            self.slot_key[s] = None  # until its read succeeded
        if self.cold is None:
            return
        got = self.cold.get_many([cold_key(k) for _, k in fetches], [self.pool.kv[s] for s in slots])
        for (slot, key), ok in zip(fetches, got):
            if ok:
                self.slot_key[slot] = key

    def _publish(self) -> None:
        """Write-through: hand the blocks this step saved (and that still hold them) to the cold tier."""
        copies, self._to_publish = self._to_publish, []
        for copy in copies:
            for slot, key in zip(copy.slots.tolist(), copy.keys):
                if self.slot_key[slot] == key:
                    self.cold.publish(cold_key(key), self.pool.kv[slot])

    def _verified(self, copy: BlockCopy) -> BlockCopy | None:
        """``copy`` without the GPU blocks whose host copy is gone (recorded as failed)."""
        keys, slot_key = copy.keys, self.slot_key
        bad = [i for i, (s, k) in enumerate(zip(copy.slots.tolist(), keys)) if slot_key[s] != k]
        if not bad:
            return copy
        self.failed_blocks.update(copy.gpu_blocks[bad].tolist())
        self.lost_slots.update(copy.slots[bad].tolist())
        keep = np.ones(len(copy), dtype=bool)
        keep[bad] = False
        if not keep.any():
            return None
        idx = np.flatnonzero(keep)
        return BlockCopy(copy.slots[idx], copy.subs[idx], copy.gpu_blocks[idx], [keys[i] for i in idx.tolist()])

    def _load_layer(self, copy: BlockCopy, layer: int):
        """Submit the copy of ``layer`` of ``copy``'s host slots into its GPU blocks; returns its event."""
        host = self._host_view(layer)
        slots, subs = torch.from_numpy(copy.slots), torch.from_numpy(copy.subs)
        gpu = torch.from_numpy(copy.gpu_blocks).to(self.device)
        cache = self.layers[layer].cache
        self.stream.wait_host_work()  # vLLM's compute stream may still use the destination blocks
        return self.stream.submit(StreamOp(  # the gather runs in stream order: after earlier saves landed
            read=lambda: host[slots, :, subs].to(self.device, non_blocking=True),
            write=lambda rows: self._scatter_gpu(layer, gpu, rows),
            poison=lambda: cache.index_fill_(0, gpu, float("nan")),
            host_dst=False,
        ))

    def _save_layers(self, copy: BlockCopy, layers: Iterable[int]):
        """Submit the copy of ``layers`` of ``copy``'s GPU blocks into their slots, after the
        compute stream's work so far; returns its event (None: done on return)."""
        for s, k in zip(copy.slots.tolist(), copy.keys):
            self.slot_key[s] = k
        layers = list(layers)
        slots, subs = torch.from_numpy(copy.slots), torch.from_numpy(copy.subs)
        gpu = torch.from_numpy(copy.gpu_blocks).to(self.device)

        def write(parts: list[torch.Tensor]) -> None:
            for layer, part in zip(layers, parts):
                self._host_view(layer)[slots, :, subs] = part.to("cpu")

        def poison() -> None:
            for layer in layers:
                self._host_view(layer)[slots, :, subs] = float("nan")

        self.stream.wait_host_work()
        return self.stream.submit(StreamOp(
            read=lambda: [self._gather_gpu(layer, gpu) for layer in layers],
            write=write,
            poison=poison,
            host_dst=True,
        ))
