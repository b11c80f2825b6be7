#!/usr/bin/env bash
# Install kvstore with its test, vLLM and LMCache extras on a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
# CPU torch first: any range that admits a newer release would pull a multi-GB CUDA build.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test,vllm,lmcache]"
# vLLM 0.32 pulls CUDA builds of torchvision/torchaudio/torchcodec that cannot import beside
# CPU torch (and would break transformers' optional imports); kvstore needs none of them.
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
