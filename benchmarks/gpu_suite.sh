#!/usr/bin/env bash
# One device call (thirteenth session, 2026-11-27): the current code on the lent GPU.
#  1. inner_loop.py --device cuda, MAML rows only: the default training step is now task by task
#     (autograd.grad per task), which changed after the last GPU record (run C of
#     inner_loop_gpu.md); the previous one-backward default, vmap and `higher` beside it.
#  2. the default test suite with the GPU visible: every Trainer that does not name
#     accelerator="cpu" (about two thirds of them) and every CLI config test then runs on CUDA.
#  3. the slow suite, with whatever time is left.
# `bash benchmarks/gpu_suite.sh rerun` (the second call, after the fixes the first one led to): the
# default-suite tests that failed on the GPU, the tests added for them, then the slow suite, stopped
# with SIGINT at its time limit so that pytest still prints its summary.
# Needs the wheels of .whl/ (webdataset, omegaconf, jsonargparse, deepspeed, higher, pydantic and
# their needs that the device image lacks; see benchmarks/gpu_check.md): run(carry=[".whl"]).
# The device image runs as root in its own venv, so the wheels and an editable install of this
# checkout go straight into it (the editable install maps datamodules/ and callbacks/ into the
# package, which PYTHONPATH alone does not).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc
  python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"; } | tee "$OUT/env.txt"

if [ "${1:-}" = rerun ]; then
    SECONDS=0
    timeout -s INT 60 python3 -m pytest -q -p no:cacheprovider -n 8 --timeout 50 -rfE \
        tests/test_deepspeed.py tests/test_optimization_review.py "tests/test_cli.py::test_config_header_and_fast_run" \
        > "$OUT/pytest_rerun_default.log" 2>&1
    echo "default-suite failures rerun exit $? after ${SECONDS}s"
    SECONDS=0
    timeout -s INT 230 python3 -m pytest -q -p no:cacheprovider -m slow -n 14 --timeout 200 -rfE \
        --junitxml="$OUT/junit_slow.xml" > "$OUT/pytest_slow.log" 2>&1
    echo "slow suite exit $? after ${SECONDS}s"
    tail -n 8 "$OUT/pytest_rerun_default.log"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest_slow.log" | tail -n 40
    exit 0
fi

SECONDS=0
timeout 120 python3 benchmarks/inner_loop.py --device cuda --meta-batch 8 32 --steps 1 5 --rounds 3 3 --warmup 1 \
    --mem-steps 1 5 --only 'MAML 2nd order' 'MAML 2nd order, one backward over the meta-batch' \
    'MAML 2nd order, vmap over tasks' 'higher, MAML 2nd order' --out "$OUT/inner_loop_gpu.md" > "$OUT/inner_loop.log" 2>&1
echo "inner_loop exit $? after ${SECONDS}s"

SECONDS=0
timeout 210 python3 -m pytest -q -p no:cacheprovider -n 12 --timeout 180 -rfE \
    --junitxml="$OUT/junit_default.xml" > "$OUT/pytest_default.log" 2>&1
echo "default suite exit $? after ${SECONDS}s"

SECONDS=0
timeout 170 python3 -m pytest -q -p no:cacheprovider -m slow -n 12 --timeout 160 -rfE \
    --junitxml="$OUT/junit_slow.xml" > "$OUT/pytest_slow.log" 2>&1
echo "slow suite exit $? after ${SECONDS}s"

tail -n 25 "$OUT/inner_loop_gpu.md"; tail -n 30 "$OUT/pytest_default.log"; tail -n 30 "$OUT/pytest_slow.log"
