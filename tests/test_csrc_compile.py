"""Every CUDA source must compile for Hopper with nvcc, so a kernel that does not build never lands."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from kvstore._locate import csrc_dir

SOURCES = sorted(csrc_dir().glob("*.cu"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_cu_compiles_for_sm90(source, tmp_path):
    out = tmp_path / (source.stem + ".cubin")
    proc = subprocess.run(
        ["nvcc", "-std=c++17", "-arch=sm_90", "-cubin", str(source), "-o", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"nvcc failed on {source.name}:\n{proc.stderr}"
    assert out.stat().st_size > 0
