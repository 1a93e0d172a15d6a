#!/usr/bin/env bash
# Issue 18's device check, for one CUDA GPU (an H200), in under 8 minutes:
#   1. the `gpu` tests (graph replay against the eager step for every bucket, the CUDA kernels,
#      seeded sampling on the device),
#   2. bench_engine.py --goals --device cuda (batch-1 ms/token, peak tok/s at 1,024 sequences,
#      TTFT of a 32K prompt, the step's profile, the softmax peer),
#   3. bench_engine.py --device cuda (throughput by concurrency, latency under a long prefill,
#      memory at 1K and 32K tokens of context).
# Tables and logs land in $OUT (default benchmarks/results/gpu_check). Each part has its own
# time limit, so a slow part leaves the others their time; the exit status is the first
# failure's. The default model must already be in the LLN home (the machine has no network).
#
#   OUT=/tmp/out PY=.venv/bin/python bash benchmarks/gpu_check.sh
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_check}
PY=${PY:-python3}
mkdir -p "$OUT"
# this checkout's packages first, whatever an editable install elsewhere points at
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

part() {  # part NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    local began=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - began)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

: >"$OUT/summary.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$OUT/summary.txt" 2>&1
part gpu_tests 130 "$PY" -m pytest -q -m gpu -p no:cacheprovider \
    tests/server/test_decode_graph.py tests/server/test_sampler.py tests/test_cuda.py
part goals 200 "$PY" benchmarks/bench_engine.py --goals --device cuda --out "$OUT"
part engine 140 "$PY" benchmarks/bench_engine.py --device cuda --out "$OUT"
tail -n 3 "$OUT/gpu_tests.log" >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
exit "$status"
