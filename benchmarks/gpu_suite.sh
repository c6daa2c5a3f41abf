#!/usr/bin/env bash
# One device call: the current code on a lent GPU (first used in the thirteenth session, one H200).
#   bash benchmarks/gpu_suite.sh [inner] [default] [slow]      (no argument: all three, about 6 min)
#  inner    inner_loop.py --device cuda, MAML rows only: the default training step (task by task),
#           the previous one-backward step, vmap and `higher` (run D of inner_loop_gpu.md; 45 s).
#  default  the default test suite with the GPU visible (pytest-xdist, 12 workers; 130 s on an
#           H200): every Trainer that does not name accelerator="cpu" (about 40 of 63) and every
#           CLI config test then runs on CUDA.
#  slow     the slow tests that train on the GPU in-process (test_model_based.py, test_compile.py)
#           and the DeepSpeed ones (CPU processes, but DeepSpeed sees the GPU), 14 workers.
# Each pytest phase stops with SIGINT at its limit, so pytest still writes its summary and the
# junit report; the failing test ids are printed from the report at the end.
# Needs the wheels of .whl/ (webdataset, omegaconf, jsonargparse, deepspeed, higher, pydantic and
# their needs that the device image lacks; see benchmarks/gpu_check.md): run(carry=[".whl"]).
# The device image runs as root in its own venv, so the wheels and an editable install of this
# checkout go straight into it (the editable install maps datamodules/ and callbacks/ into the
# package, which PYTHONPATH alone does not).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
phases=${*:-inner default slow}
python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc
  python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"; } | tee "$OUT/env.txt"

failures() {  # the failed and errored test ids of a junit report
    python3 - "$1" <<'EOF'
import sys
import xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as e:
    sys.exit(f"no junit report: {e}")
for case in root.iter("testcase"):
    bad = case.find("failure") if case.find("failure") is not None else case.find("error")
    if bad is not None:
        print("FAILED", case.get("classname"), case.get("name"), "::", (bad.get("message") or "")[:160])
EOF
}

if [[ " $phases " == *" inner "* ]]; then
    SECONDS=0
    timeout 120 python3 benchmarks/inner_loop.py --device cuda --meta-batch 8 32 --steps 1 5 --rounds 3 3 --warmup 1 \
        --mem-steps 1 5 --only 'MAML 2nd order' 'MAML 2nd order, one backward over the meta-batch' \
        'MAML 2nd order, vmap over tasks' 'higher, MAML 2nd order' --out "$OUT/inner_loop_gpu.md" > "$OUT/inner_loop.log" 2>&1
    echo "inner_loop exit $? after ${SECONDS}s"
fi
if [[ " $phases " == *" default "* ]]; then
    SECONDS=0
    timeout -s INT 200 python3 -m pytest -q -p no:cacheprovider -n 12 --timeout 180 -rfE \
        --junitxml="$OUT/junit_default.xml" > "$OUT/pytest_default.log" 2>&1
    echo "default suite exit $? after ${SECONDS}s"
fi
if [[ " $phases " == *" slow "* ]]; then
    SECONDS=0
    timeout -s INT 150 python3 -m pytest -q -p no:cacheprovider -m slow -n 14 --timeout 140 -rfE \
        tests/test_model_based.py tests/test_compile.py tests/test_deepspeed.py \
        --junitxml="$OUT/junit_slow.xml" > "$OUT/pytest_slow.log" 2>&1
    echo "slow tests exit $? after ${SECONDS}s"
fi

[ -f "$OUT/inner_loop_gpu.md" ] && sed -n '/^### Speed/,/^Total wall/p' "$OUT/inner_loop_gpu.md"
for f in "$OUT"/pytest_*.log; do [ -f "$f" ] && { echo "== $f"; grep -E "[0-9]+ (passed|failed)" "$f" | tail -n 1; }; done
for f in "$OUT"/junit_*.xml; do [ -f "$f" ] && { echo "== $f"; failures "$f"; }; done
