#!/usr/bin/env bash
# Validate and benchmark kvstore's CUDA paths on an H100/H200 in one call of the device tool.
#
# Prepare here (the device machine has no internet; its image has Python 3.12, torch, cupy,
# pytest, no faiss and no hypothesis):
#     pip download --no-deps -d .wheels hypothesis sortedcontainers attrs
# then call the device tool with
#     command: bash scripts/gpu-check.sh     carry: [".wheels"]     timeout_s: 600
# Everything comes back in $OUT (at most 8 files): summary.txt (one line per step with its exit
# status and time), tests.log, bench.log and one JSON per benchmark. Each step has its own
# time limit, so one slow step cannot eat the others; the whole script stays under ~9 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kvstore-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# the CUDA paths are off by default; "auto" picks the kernels for CUDA tensors when cupy imports
export KVSTORE_ATTN_BACKEND=auto KVSTORE_PQ_BACKEND=auto KVSTORE_H2D_PATH=auto KVSTORE_ROWS_BACKEND=auto
summary="$OUT/summary.txt"

step() {  # step NAME SECONDS LOG COMMAND...: run with a time limit, append its status to the summary
    local name=$1 limit=$2 log=$3
    shift 3
    local t0=$SECONDS
    echo "=== $name: $*" >>"$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    echo "$name rc=$rc ${limit}s-limit took=$((SECONDS - t0))s" | tee -a "$summary"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
    python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
    python -c "import cupy; print('cupy', cupy.__version__)" || echo "cupy missing: kernels fall back to torch"
    command -v nvcc >/dev/null && nvcc --version | tail -1 || echo "no nvcc (kernels compile through NVRTC)"
} >"$summary" 2>&1
if compgen -G ".wheels/*.whl" >/dev/null; then
    python -m pip install -q --no-index --no-deps .wheels/*.whl >>"$summary" 2>&1 || echo "wheel install failed" >>"$summary"
fi

# 1. every test that touches CUDA (kernels against their torch references), plus the CPU tests of
#    the same modules
step tests 180 "$OUT/tests.log" python -m pytest -q -p no:cacheprovider \
    tests/attn tests/pq tests/test_transfer_cuda.py tests/test_transfer_order.py tests/test_store.py tests/test_store_pq.py \
    tests/test_rowcache.py tests/test_syncs.py
# 2. the benchmarks of issues 5, 6 and 8 (and the block store's GPU copy comparison)
#    (the limits add up to 540 s, under the device tool's 600 s per call)
#    long-context: llama3-8b's 32 layers through the UVA row gather and the row cache; its
#    "h2d / selected" and "syncs / layer" columns are issue 14's figures
step bench_long 150 "$OUT/bench.log" python -m kvstore.cli bench long-context --device cuda --contexts 32768 --steps 8 \
    --modes full,pq,pq-codes,exact,lossless --json "$OUT/long_context.json"
step bench_decode 120 "$OUT/bench.log" python -m kvstore.cli bench decode --device cuda --skip-pqcache-train --json "$OUT/decode.json"
step bench_attn 60 "$OUT/bench.log" python -m kvstore.cli bench attn --device cuda --json "$OUT/attn.json"
step bench_store 30 "$OUT/bench.log" python -m kvstore.cli bench store --device cuda --json "$OUT/store.json"
tail -n 3 "$OUT/tests.log" >>"$summary"
cat "$summary"
