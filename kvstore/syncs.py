"""Host-device synchronisations: count them (:class:`SyncCounter`), defer the checks that need
them (:class:`DeferredChecks`).

**Counting.** What a piece of code syncs, or would sync on CUDA.

A decode step must not wait for the device (DESIGN.md, "The decode step does not sync"). What
waits is easy to write by accident: ``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``,
``.cpu()``, ``.numpy()``, ``torch.nonzero``, ``torch.unique``, a boolean-mask index, a blocking
copy to the host. :class:`SyncCounter` records every such call on a *device-bound* tensor:

* on CUDA, a tensor on the counted device;
* on a CPU (where every tensor is a CPU tensor) a *tagged* one: tensors given to :meth:`tag`
  or found by :meth:`tag_tree` (a store's pools and indexes), tensors a factory creates with an
  explicit ``device=`` while counting, and every result of an op with a device-bound input.
  Host data stays untagged: numpy arrays and tensors made from them, the host tier's pool.

So the same test counts on a CPU what the code would sync on a GPU, and the benchmarks report
``syncs_per_layer_step`` from it. Sites are kept with their caller (file:line) for messages.
Ops run unchanged: the counter observes (it is a ``TorchDispatchMode`` plus wrappers of the few
``Tensor`` methods that do not dispatch on a CPU).

**Deferring.** A check that needs a value computed on the device (NaN/Inf in appended K/V, the
PQ index's drift, which blocks a step read) is registered as a device tensor and a callback;
:meth:`DeferredChecks.flush` reads every pending value with one copy to the host (one sync)
and runs the callbacks, raising the first error after all of them ran. Immediate mode (the
default off CUDA, where a read costs nothing) runs each check as it is registered.
"""

from __future__ import annotations

import sys
import traceback
from collections import Counter
from typing import Any, Callable, Iterable

import numpy as np

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["DeferredChecks", "SyncCounter", "upload"]

_aten = torch.ops.aten
#: ops whose result the host needs before it can go on (a device sync on CUDA)
_SYNC_OPS = {
    _aten._local_scalar_dense.default,  # item(), int(), float(), bool() of a tensor, __index__
    _aten.is_nonzero.default,
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
    _aten.equal.default,
    _aten.bincount.default,
}
#: ops that sync when given a boolean mask (its nonzero positions)
_MASK_OPS = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default}
#: Tensor methods that read data on the host without dispatching an op on a CPU tensor
_HOST_READS = ("tolist", "numpy", "cpu", "__array__")


class SyncCounter(TorchDispatchMode):
    """``with SyncCounter(device) as syncs: ...`` then ``syncs.count`` / ``syncs.sites``.

    Args:
        device: the device whose tensors count (``"cuda"``, or the CPU standing in for it).
        tag: tensors to treat as device-bound from the start (CPU only).
    """

    def __init__(self, device: torch.device | str, *, tag: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.device = torch.device(device)
        self._tagged = WeakTensorKeyDictionary()
        self.sites: Counter[str] = Counter()
        self._paused = 0
        self._saved: dict[str, Any] = {}
        self.tag(*tag)

    # ------------------------------------------------------------------ tagging
    def tag(self, *tensors: torch.Tensor) -> None:
        """Treat ``tensors`` as device-bound."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._tagged[t] = True

    def tag_tree(self, obj: object, *, exclude: Iterable[torch.Tensor] = (), depth: int = 6) -> None:
        """Tag every tensor reachable from ``obj`` (attributes, dicts, lists), but ``exclude``."""
        skip = {id(t) for t in exclude}
        seen: set[int] = set()

        def walk(x: object, d: int) -> None:
            if d < 0 or id(x) in seen or x is None or isinstance(x, (str, bytes, int, float, bool, type)):
                return
            seen.add(id(x))
            if isinstance(x, torch.Tensor):
                if id(x) not in skip:
                    self._tagged[x] = True
                return
            if callable(x) and not hasattr(x, "__dict__"):
                return
            if isinstance(x, dict):
                items = list(x.values())
            elif isinstance(x, (list, tuple, set, frozenset)):
                items = list(x)
            elif hasattr(x, "__dict__") or hasattr(x, "__slots__"):
                items = list(getattr(x, "__dict__", {}).values())
                items += [getattr(x, s, None) for s in getattr(type(x), "__slots__", ())]
            else:
                return
            for item in items:
                walk(item, d - 1)

        walk(obj, depth)

    def is_device_bound(self, t: object) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        if self.device.type != "cpu":
            return t.device.type == self.device.type
        return t in self._tagged

    # ------------------------------------------------------------------ results
    @property
    def count(self) -> int:
        return sum(self.sites.values())

    def reset(self) -> None:
        self.sites.clear()

    def _record(self, what: str) -> None:
        frame = _caller()
        self.sites[f"{what} at {frame}"] += 1

    # ------------------------------------------------------------------ interception
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        bound = any(self.is_device_bound(t) for t in flat)
        if bound and not self._paused:
            if func in _SYNC_OPS:
                self._record(func.__name__)
            elif func in _MASK_OPS and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in flat[1:]):
                self._record(f"{func.__name__} with a boolean mask")
            elif func in (_aten._to_copy.default, _aten.copy_.default) and self._blocking_download(func, args, kwargs):
                self._record("blocking copy to the host")
        out = func(*args, **kwargs)
        if self.device.type == "cpu" and not self._paused:
            explicit = "device" in kwargs and torch.device(kwargs["device"]).type == "cpu" and not _has_tensor(flat)
            if bound or explicit:
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        self._tagged[t] = True
        return out

    def _blocking_download(self, func, args, kwargs) -> bool:
        if kwargs.get("non_blocking", False) or (len(args) > 2 and args[2] is True):
            return False
        if func is _aten._to_copy.default:
            target = kwargs.get("device")
            return target is not None and torch.device(target).type == "cpu" and self.device.type != "cpu"
        dst, src = args[0], args[1]
        return self.is_device_bound(src) and not self.is_device_bound(dst) and dst.device.type == "cpu"

    def __enter__(self):
        for name in _HOST_READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original
            setattr(torch.Tensor, name, self._wrap_host_read(name, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
        return super().__exit__(*exc)

    def _wrap_host_read(self, name: str, original):
        counter = self

        def host_read(t, *args, **kwargs):
            if counter.is_device_bound(t) and not counter._paused:
                counter._record(f"Tensor.{name}")
            counter._paused += 1  # .numpy() may call .cpu(): one read, counted once
            try:
                out = original(t, *args, **kwargs)
                if out is t:  # .cpu() of a CPU tensor: what comes back is host data now
                    out = t.detach()
                return out
            finally:
                counter._paused -= 1

        return host_read


def _has_tensor(flat: list) -> bool:
    return any(isinstance(t, torch.Tensor) for t in flat)


def _caller() -> str:
    """The innermost kvstore frame outside this module (else the innermost frame)."""
    here = __file__
    frames = traceback.extract_stack(sys._getframe(2))
    for f in reversed(frames):
        if f.filename != here and "/kvstore/" in f.filename and "/torch/" not in f.filename:
            return f"{f.filename.rsplit('/kvstore/', 1)[-1]}:{f.lineno}"
    f = frames[-1]
    return f"{f.filename}:{f.lineno}"


class DeferredChecks:
    """Device-side values and what to do with them, read together (see the module docstring).

    Args:
        immediate: run each check when it is added (a sync per check on CUDA) instead of at
            :meth:`flush`.
    """

    def __init__(self, *, immediate: bool) -> None:
        self.immediate = immediate
        self._pending: list[tuple[torch.Tensor, Callable[[np.ndarray], None]]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, value: torch.Tensor, then: Callable[[np.ndarray], None]) -> None:
        """Call ``then(value as a host int64 array)`` at the next :meth:`flush` (now when immediate)."""
        if self.immediate:
            then(value.detach().reshape(-1).to("cpu", torch.int64).numpy())
        else:
            self._pending.append((value.detach().reshape(-1), then))

    def flush(self) -> None:
        """Read every pending value (one copy to the host) and run the callbacks in order; the
        first KVStoreError any of them raised is raised after all ran."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        values = torch.cat([v.to(torch.int64) for v, _ in pending]).cpu().numpy()
        from kvstore.errors import KVStoreError

        first: KVStoreError | None = None
        at = 0
        for value, then in pending:
            n = value.numel()
            try:
                then(values[at : at + n])
            except KVStoreError as exc:
                first = first or exc
            at += n
        if first is not None:
            raise first


def upload(array, device: torch.device | str) -> torch.Tensor:
    """A host array (numpy or a list) as an int64/float tensor on ``device`` without waiting for
    the device: on CUDA through pinned memory and a non-blocking copy (torch waits for the stream
    after a blocking host-to-device copy); elsewhere a tensor over a copy of the data."""
    t = torch.from_numpy(np.array(array, copy=True))
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
