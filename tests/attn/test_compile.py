"""csrc/multi_segment_attention.cu compiles under NVRTC (the runtime path) without a GPU.

The full offline check (every instantiation, nvcc -std=c++17 -arch=sm_90 -cubin) runs in CI;
here NVRTC compiles the instantiations kvstore.attn.kernel would request for each dtype, head
dim, row tile and addressing mode, catching host-only headers or NVRTC-only errors.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvstore._locate import csrc_path
from kvstore.attn import kernel


def _cuda_include() -> Path | None:
    candidates = [Path(os.environ[v]) / "include" for v in ("CUDA_PATH", "CUDA_HOME") if v in os.environ]
    candidates.append(Path("/usr/local/cuda/include"))
    try:
        import nvidia.cu13

        candidates += [Path(p) / "include" for p in nvidia.cu13.__path__]
    except ImportError:
        pass
    return next((c for c in candidates if (c / "cuda_bf16.h").is_file()), None)


def test_kernel_compiles_with_nvrtc(nvrtc):
    include = _cuda_include()
    if include is None:
        pytest.skip("no CUDA headers (cuda_bf16.h) found")
    names = [f"msa_partial<{c}, {d}, {rows}, {mode}>"
             for c, d, rows, mode in [("float", 64, 1, 0), ("__half", 128, 4, 1), ("__nv_bfloat16", 256, 8, 0),
                                      ("__nv_bfloat16", 128, 2, 1), ("float", 256, 8, 1)]]  # fmt: skip
    names += [f"msa_merge<{a}, {b}>" for a, b in [("float", "__nv_bfloat16"), ("__half", "__half")]]
    assert set(kernel._CTYPES.values()) == {"float", "__half", "__nv_bfloat16"}
    prog = nvrtc.createProgram(csrc_path("multi_segment_attention.cu").read_text(), "msa.cu", [], [])
    for name in names:
        nvrtc.addNameExpression(prog, name)
    try:
        nvrtc.compileProgram(prog, ["-std=c++17", "-arch=sm_90", f"-I{include}"])
    except Exception as exc:
        pytest.fail(f"NVRTC failed: {exc}\n{nvrtc.getProgramLog(prog)}")
    for name in names:
        assert nvrtc.getLoweredName(prog, name).startswith("_Z")
    assert len(nvrtc.getCUBIN(prog)) > 0
