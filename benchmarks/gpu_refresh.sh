#!/usr/bin/env bash
# One device call (eighth session, 2026-11-27): the current code on the lent GPU.
#  1. the per-task loop (now with torch.autograd.grad inner gradients), vmap, first order and
#     `higher` at meta-batch 8 and 32 (the loop rows of inner_loop_gpu.md predate that engine);
#  2. gpu_check sections 1 (strategies equal the plain run) and 2 (bf16 drift) on the current code.
# Needs the wheels of .whl/ (webdataset, omegaconf, jsonargparse, deepspeed, higher and their
# needs; see benchmarks/gpu_check.md) carried along: run(carry=[".whl"]).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc
  python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"; } | tee "$OUT/env.txt"
python3 benchmarks/inner_loop.py --device cuda --meta-batch 8 32 --steps 1 5 --rounds 3 3 --warmup 1 --mem-steps 1 5 \
    --only 'MAML 2nd order' 'MAML 2nd order, vmap over tasks' 'MAML 2nd order, per-task backward' 'MAML 1st order' \
    'higher, MAML 2nd order' --out "$OUT/inner_loop_gpu.md" > "$OUT/inner_loop.log" 2>&1
echo "inner_loop exit $?"
python3 benchmarks/gpu_check.py --sections 12 --out "$OUT/gpu_check_12.md" > "$OUT/gpu_check.log" 2>&1
echo "gpu_check exit $?"
tail -c 3000 "$OUT/inner_loop_gpu.md"; tail -c 2500 "$OUT/gpu_check_12.md"
