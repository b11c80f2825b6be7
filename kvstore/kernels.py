"""The one module in kvstore that imports cupy: compile csrc/*.cu with NVRTC, cache, launch.

``load_kernel(source, function)`` compiles ``csrc/<source>`` through ``cupy.RawModule`` at first
use and caches the module per (source, options, name expressions, device); cupy also keeps
the compiled binary in its on-disk cache, so a new process does not compile again. Template
kernels are named by their C++ instantiation, e.g. ``"msa_partial<__half, 128, 4, 0>"``, and
only the instantiations asked for are compiled.

``launch(kernel, grid, block, args, device=...)`` runs a kernel on torch's current CUDA stream
of ``device``. Arguments follow the kernel's C signature exactly: tensors as :func:`ptr`
(their ``data_ptr``), integers as :func:`i32` / :func:`i64`, floats as :func:`f32`. Nothing
here checks shapes: the kernel's wrapper does that before it builds the arguments.

``import cupy`` happens inside these functions only, so importing kvstore never needs cupy.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from kvstore._locate import csrc_path
from kvstore.errors import ConfigError, KernelError, ShapeError

__all__ = ["BACKENDS", "DEFAULT_OPTIONS", "cupy_available", "resolve_backend", "load_kernel", "launch", "ptr", "i32", "i64", "f32"]

#: NVRTC options every kvstore kernel is compiled with (cupy adds -arch for the device).
DEFAULT_OPTIONS: tuple[str, ...] = ("-std=c++17",)


@functools.cache
def cupy_available() -> bool:
    """Whether cupy imports (it is the ``cuda`` extra); says nothing about a GPU being present."""
    try:
        import cupy  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install failing at import
        return False
    return True


def _auto(device: torch.device, what: str) -> str:
    return "cuda" if device.type == "cuda" and cupy_available() else "torch"


def _forced_cuda(device: torch.device, what: str) -> str:
    if device.type != "cuda":
        raise ShapeError(f"{what} 'cuda' needs CUDA tensors, got tensors on {device}")
    if not cupy_available():
        raise KernelError(f"{what} 'cuda' needs cupy: pip install 'kvstore[cuda]'")
    return "cuda"


#: backend name -> which implementation it picks for tensors on a device ("torch" or "cuda"):
#: "auto" the kernel for CUDA tensors when cupy imports, "torch" the reference, "cuda" the kernel.
BACKENDS: dict[str, Callable[[torch.device, str], str]] = {
    "auto": _auto,
    "torch": lambda device, what: "torch",
    "cuda": _forced_cuda,
}


def resolve_backend(backend: str | None, device: torch.device, *, env: str, default: str, what: str = "backend") -> str:
    """The implementation (``"torch"`` or ``"cuda"``) a call with tensors on ``device`` uses.

    ``backend`` names one of :data:`BACKENDS`; None reads the environment variable ``env``,
    else ``default``. ``what`` names the switch in error messages.
    """
    name = os.environ.get(env, default) if backend is None else backend
    try:
        pick = BACKENDS[name]
    except KeyError:
        source = f"${env}" if backend is None else what
        raise ConfigError(f"{source}={name!r} is not one of {sorted(BACKENDS)}") from None
    return pick(device, what)


def _cupy():
    if not cupy_available():
        raise KernelError("kvstore CUDA kernels need cupy: pip install 'kvstore[cuda]'")
    import cupy

    return cupy


def _device_index(device: torch.device | int | None) -> int:
    if isinstance(device, int):
        return device
    if device is None or device.index is None:
        return torch.cuda.current_device()
    return device.index


@functools.cache
def _module(source_name: str, options: tuple[str, ...], name_expressions: tuple[str, ...] | None, device_index: int):
    cupy = _cupy()
    try:
        source = csrc_path(source_name).read_text()
    except FileNotFoundError as exc:
        raise KernelError(str(exc)) from None
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=source, options=options, name_expressions=name_expressions)
        try:
            module.compile()
        except cupy.cuda.compiler.CompileException as exc:
            raise KernelError(f"compiling csrc/{source_name} with {options} failed:\n{exc}") from None
    return module


def load_kernel(
    source_name: str,
    function_name: str,
    *,
    options: Sequence[str] = DEFAULT_OPTIONS,
    name_expressions: Sequence[str] | None = None,
    device: torch.device | int | None = None,
):
    """The compiled kernel ``function_name`` of ``csrc/<source_name>`` on ``device`` (a ``cupy.RawKernel``).

    Args:
        source_name: file name under csrc/, e.g. ``"multi_segment_attention.cu"``.
        function_name: an ``extern "C"`` name or a template instantiation
            (``"msa_merge<float, __half>"``).
        options: NVRTC options (part of the cache key).
        name_expressions: the template instantiations to compile into this module; by default
            ``(function_name,)`` for a template instantiation and None (plain extern "C"
            kernels) otherwise.
        device: CUDA device (default: torch's current device).

    Raises:
        KernelError: cupy is missing, the source is missing, or it does not compile.
    """
    _cupy()  # a clear KernelError before anything touches CUDA
    if name_expressions is None and "<" in function_name:
        name_expressions = (function_name,)
    names = tuple(name_expressions) if name_expressions is not None else None
    module = _module(source_name, tuple(options), names, _device_index(device))
    try:
        return module.get_function(function_name)
    except Exception as exc:  # cupy raises several types for an unknown name
        raise KernelError(f"csrc/{source_name} has no kernel {function_name!r}: {exc}") from None


@functools.cache
def _stream(device_index: int, handle: int):
    """cupy's handle on the torch stream ``handle`` (0 is the legacy default stream)."""
    cupy = _cupy()
    if handle == 0:
        return cupy.cuda.Stream.null
    with cupy.cuda.Device(device_index):
        torch_stream = torch.cuda.ExternalStream(handle, device=torch.device("cuda", device_index))
        return cupy.cuda.Stream.from_external(torch_stream)


def launch(
    kernel,
    grid: tuple[int, ...],
    block: tuple[int, ...],
    args: tuple,
    *,
    device: torch.device | int | None = None,
    shared_mem: int = 0,
) -> None:
    """Launch ``kernel`` on torch's current stream of ``device`` (asynchronous, like a torch op)."""
    cupy = _cupy()
    index = _device_index(device)
    stream = _stream(index, torch.cuda.current_stream(index).cuda_stream)
    try:
        with cupy.cuda.Device(index), stream:
            kernel(grid, block, args, shared_mem=shared_mem)
    except cupy.cuda.driver.CUDADriverError as exc:
        raise KernelError(f"launching {kernel.name} grid={grid} block={block} failed: {exc}") from None


def ptr(tensor: torch.Tensor | None) -> np.uint64:
    """A tensor argument: its data pointer (``nullptr`` for None)."""
    return np.uint64(0 if tensor is None else tensor.data_ptr())


def i32(value: int) -> np.int32:
    """An ``int`` argument (raises OverflowError rather than wrapping)."""
    if not -(2**31) <= value < 2**31:
        raise OverflowError(f"{value} does not fit a 32-bit kernel argument")
    return np.int32(value)


def i64(value: int) -> np.int64:
    """A ``long long`` argument."""
    return np.int64(value)


def f32(value: float) -> np.float32:
    """A ``float`` argument."""
    return np.float32(value)
