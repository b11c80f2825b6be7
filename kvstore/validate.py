"""One validation layer for the numbers a caller hands kvstore: ids, positions, counts, sizes.

Every public entry point (the store, the PQ index, the trace loader, the connector config)
checks its scalars and index arrays here, so the rules are the same everywhere:

* **Exact integers.** A Python ``int`` or any numpy integer (``np.int8`` .. ``np.uint64``) is
  an integer and is used by value (``np.uint64(2**64 - 1)`` is 18446744073709551615, never
  -1). ``bool`` (also ``np.bool_``), floats (also integral ones such as ``2.0``), strings and
  ``None`` are not: nothing is truncated or coerced.
* **Bounds named.** An integer outside its range raises naming the value as given and the
  range, e.g. ``layer 2 out of range [0, 2)``; a value of the wrong type raises naming it,
  e.g. ``layer 1.5 must be an integer in [0, 2)``.
* **Index arrays** (block ids, token positions) may be a list, tuple or range of integers, a numpy
  array or a torch tensor of an integer dtype. Lists are checked element by element (numpy
  would turn ``[-1, 2**63]`` into floats and ``[True, 1]`` into ints); arrays and tensors by
  dtype, then by range in their own dtype, so a uint64 id above ``2**63`` is out of range, not
  wrapped. The result is an int64 numpy array.
* **Numbers** (budgets, fractions, GiB) may be Python or numpy ints and floats, never bools;
  they must be finite unless the caller allows infinity.

Each function takes the error class to raise (a :class:`~kvstore.errors.KVStoreError`
subclass) so that a caller keeps its documented class: ConfigError at construction,
OutOfRangeError for a layer or block id, ShapeError for an array of the wrong dtype. The
functions change nothing, so a caller that validates first leaves its state as it was.

Importing this module does not import torch (``kvstore --help`` builds its parsers through it):
a value can only be a tensor once torch was imported, so the tensor checks look for torch in
``sys.modules``, and :func:`device` and :func:`tier_bytes` import it when called.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from kvstore.errors import ConfigError, KVStoreError, OutOfRangeError, ShapeError

if TYPE_CHECKING:
    import torch

__all__ = [
    "INT64_MAX",
    "MAX_BLOCKS",
    "show",
    "is_integer",
    "integer",
    "tier_blocks",
    "number",
    "mapping",
    "device",
    "tier_bytes",
    "probe_write",
    "index_array",
]

INT64_MAX = 2**63 - 1

#: Upper bound (exclusive) of a tier's size in blocks, and of any block count. Block ids, slots,
#: positions and byte offsets are int64: a slot's byte offset is ``slot * bytes_per_block``, and
#: ``bytes_per_block`` is at most 2**23 for every preset (llama3-70b: 80 layers x 2 x 16 tokens x
#: 8 heads x 128 x 2 bytes = 5.2 MB), so 2**40 blocks keep every offset below 2**63. It is not a
#: memory limit (even 2**30 blocks are petabytes at that size): allocation failures are reported
#: separately, naming the bytes.
MAX_BLOCKS = 2**40

_SHOW_CHARS = 60


def show(value: object) -> str:
    """``value`` as error messages name it: an integer by its exact value (numpy integers
    included), anything else by its ``repr``, cut to 60 characters."""
    if is_integer(value):
        return str(int(value))  # type: ignore[arg-type]
    if _is_tensor(value):
        text = f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    else:
        text = repr(value)
    return text if len(text) <= _SHOW_CHARS else text[: _SHOW_CHARS - 3] + "..."


def _is_tensor(value: object) -> bool:
    """A torch.Tensor (False without importing torch: none can exist before it is imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def is_integer(value: object) -> bool:
    """A Python int or a numpy integer, not a bool."""
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, np.integer)


def _range(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f"[{lo}, {hi})"
    if lo is not None:
        return f">= {lo}"
    if hi is not None:
        return f"< {hi}"
    return "any"


def integer(
    value: object, what: str, *, lo: int | None = None, hi: int | None = None,
    error: type[KVStoreError] = ConfigError,
) -> int:
    """``value`` as a Python int, checked to lie in ``[lo, hi)`` (either bound may be None).

    Raises ``error`` naming ``what``, the value and the range: "``what`` ``value`` must be an
    integer in ``[lo, hi)``" for a non-integer, "``what`` ``value`` out of range ``[lo, hi)``"
    for an integer outside it.
    """
    if not is_integer(value):
        raise error(f"{what} {show(value)} must be an integer {_range(lo, hi)} (got {type(value).__name__})")
    v = int(value)  # type: ignore[arg-type]
    if (lo is not None and v < lo) or (hi is not None and v >= hi):
        raise error(f"{what} {v} out of range {_range(lo, hi)}")
    return v


def tier_blocks(value: object, what: str, *, lo: int = 0, error: type[KVStoreError] = ConfigError) -> int:
    """A tier size or block count: an integer in ``[lo, MAX_BLOCKS)`` (see :data:`MAX_BLOCKS`)."""
    if is_integer(value) and int(value) >= MAX_BLOCKS:  # type: ignore[arg-type]
        raise error(
            f"{what} {int(value)} out of range [{lo}, 2**40): block ids, slots and byte offsets are int64 "  # type: ignore[arg-type]
            f"(2**40 blocks of up to 2**23 bytes keep every offset below 2**63)"
        )
    return integer(value, what, lo=lo, hi=MAX_BLOCKS, error=error)


def number(
    value: object, what: str, *, lo: float | None = None, hi: float | None = None,
    lo_open: bool = False, hi_open: bool = False, allow_inf: bool = False,
    error: type[KVStoreError] = ConfigError,
) -> float:
    """``value`` (a Python or numpy int or float, not a bool) as a float in the given interval.

    ``lo``/``hi`` are inclusive unless ``lo_open``/``hi_open``. NaN is always rejected,
    infinity unless ``allow_inf``.
    """
    ok_type = is_integer(value) or (isinstance(value, (float, np.floating)) and not isinstance(value, bool))
    left = "" if lo is None else ("(" if lo_open else "[") + f"{lo}"
    right = "" if hi is None else f"{hi}" + (")" if hi_open else "]")
    where = f"in {left or '(-inf'}, {right or 'inf)'}"
    if not ok_type:
        raise error(f"{what} {show(value)} must be a number {where} (got {type(value).__name__})")
    v = float(value)  # type: ignore[arg-type]
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise error(f"{what} {show(value)} must be a finite number {where}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise error(f"{what} {show(value)} out of range: must be {where}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise error(f"{what} {show(value)} out of range: must be {where}")
    return v


def mapping(value: object, what: str, *, error: type[KVStoreError] = ConfigError) -> dict:
    """``value`` as a dict with string keys (None is an empty one): what an ``extra_config``
    must be. Returns a shallow copy."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise error(f"{what} must be a dict, got {show(value)} ({type(value).__name__})")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise error(f"{what} keys must be strings, got {show(bad[0])}")
    return dict(value)


_DEVICE_TYPES = ("cpu", "cuda")


def device(
    value: object, what: str, *, types: tuple[str, ...] = _DEVICE_TYPES, error: type[KVStoreError] = ConfigError,
) -> torch.device:
    """``value`` (a ``torch.device`` or a string such as ``"cpu"``, ``"cuda:1"``) as a
    torch.device of one of ``types`` that exists here: a CUDA device needs CUDA and an index
    below the device count."""
    import torch

    if not isinstance(value, (str, torch.device)):
        raise error(f"{what} must be a torch.device or a string such as 'cpu' or 'cuda:0', got {show(value)}")
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError) as e:
        raise error(f"{what} {show(value)} is not a device ({e})") from None
    if dev.type not in types:
        raise error(f"{what} {show(value)}: must be a {' or '.join(types)} device, not {dev.type!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise error(f"{what} {show(value)}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise error(f"{what} {show(value)}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def tier_bytes(num_slots: int, bytes_per_slot: int, dev: "torch.device", what: str, *, error: type[KVStoreError] = ConfigError) -> int:
    """Bytes of a tier of ``num_slots`` slots on ``dev`` (``num_slots * bytes_per_slot``),
    refused when they exceed the memory there is: the machine's physical memory for a CPU
    tier, the GPU's total memory for a CUDA one (a meta tier holds no bytes). The tier is
    not allocated here; an allocation that fails anyway is the allocator's error."""
    total = num_slots * bytes_per_slot
    if dev.type == "cpu":
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        where = "this machine's memory"
    elif dev.type == "cuda":
        import torch

        have = torch.cuda.get_device_properties(dev).total_memory
        where = f"the memory of {dev}"
    else:
        return total
    if total > have:
        raise error(
            f"{what} {num_slots} blocks x {bytes_per_slot} bytes = {total / 2**30:.1f} GiB exceeds "
            f"{where} ({have / 2**30:.1f} GiB)"
        )
    return total


def probe_write(directory: str | os.PathLike) -> None:
    """Create an empty file in ``directory`` and remove it at once: raises the OSError a real
    write there would. ``os.access`` reads mode bits only, so root "may write" /proc or a
    read-only mount; the output-path checks and the cold tier's disk path ask the kernel."""
    fd, probe = tempfile.mkstemp(prefix=".kvstore-write-check-", dir=directory)
    os.close(fd)
    os.unlink(probe)


_TORCH_INTS = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def index_array(
    values: object, what: str, *, lo: int, hi: int,
    error: type[KVStoreError] = OutOfRangeError, type_error: type[KVStoreError] = ShapeError,
) -> np.ndarray:
    """Integer ids or positions as a flat int64 numpy array, each in ``[lo, hi)``.

    ``values``: one integer, a list/tuple of integers, a numpy array or a torch tensor (any
    device; read to the host) of an integer dtype. A non-integer element or dtype raises
    ``type_error`` naming it; values outside ``[lo, hi)`` raise ``error`` naming (up to 8 of)
    them exactly. ``lo >= -2**63`` and ``hi <= 2**63``.
    """
    if _is_tensor(values):
        if str(values.dtype).removeprefix("torch.") not in _TORCH_INTS:
            raise type_error(f"{what} must be integers, got a tensor of dtype {values.dtype}")
        arr = values.detach().cpu().numpy().reshape(-1)
    elif isinstance(values, np.ndarray):
        if not np.issubdtype(values.dtype, np.integer):
            raise type_error(f"{what} must be integers, got an array of dtype {values.dtype}")
        arr = values.reshape(-1)
    elif isinstance(values, range):
        if len(values) and not (lo <= min(values) and max(values) < hi):  # O(1) for a range
            bad = [x for x in (min(values), max(values)) if not lo <= x < hi]
            raise error(f"{what} {bad} out of range [{lo}, {hi})")
        return np.arange(values.start, values.stop, values.step, dtype=np.int64)
    elif isinstance(values, (list, tuple)) or is_integer(values):
        items = list(values) if isinstance(values, (list, tuple)) else [values]
        bad = [x for x in items if not is_integer(x)]
        if bad:
            raise type_error(f"{what} must be integers, got {show(bad[0])} ({type(bad[0]).__name__})")
        out_of = [int(x) for x in items if not lo <= int(x) < hi]
        if out_of:
            raise error(f"{what} {out_of[:8]} out of range [{lo}, {hi})")
        return np.array([int(x) for x in items], dtype=np.int64)
    else:
        raise type_error(f"{what} must be integers (a list, numpy array or tensor), got {show(values)}")
    bad_mask = (arr < lo) | (arr >= hi)  # in the array's own dtype: a uint64 above 2**63 stays itself
    if bad_mask.any():
        raise error(f"{what} {arr[bad_mask][:8].tolist()} out of range [{lo}, {hi})")
    return arr.astype(np.int64)
