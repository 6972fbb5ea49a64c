#!/usr/bin/env bash
# One short GPU check (target: under 8 minutes on one H100/H200), run from the repo root:
#   bash benchmarks/gpu_check.sh
# 1. engine equivalence tests against transformers on CUDA (float32 and bfloat16);
# 2. a few RL steps of the tiny config with the model on CUDA (NCCL weight sync);
# 3. the engine benchmark (quick grid) on CUDA.
# Prints one table at the end; each part's log is in $OUT (or /tmp/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=.venv/bin/python
if [ ! -x "$PY" ]; then
  python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q torch && .venv/bin/pip install -q -e '.[test]'
fi
declare -A RESULT TIME

run() {  # name, command...
  local name=$1; shift
  local start=$(date +%s)
  if timeout 420 "$@" >"$OUT/$name.log" 2>&1; then RESULT[$name]=pass; else RESULT[$name]="FAIL (rc=$?, see $OUT/$name.log)"; fi
  TIME[$name]=$(( $(date +%s) - start ))
}

$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.cuda.get_device_name(0))" | tee "$OUT/device.txt"
run equivalence env RESPEC_TEST_DEVICE=cuda $PY -m pytest -q tests/engine -k "equivalence or cache or exact" -x
run rl_steps $PY -m respec_async.cli launch configs/tiny.toml --set model.device=\"cuda\" --set trainer.num_steps=4 \
    --set supervisor.live_status=false --set run.root=\"$OUT/runs\"
run bench_engine $PY benchmarks/bench_engine.py --device cuda --quick --out "$OUT/bench_engine.json"

echo
printf "%-14s %-8s %s\n" check seconds result
for name in equivalence rl_steps bench_engine; do
  printf "%-14s %-8s %s\n" "$name" "${TIME[$name]}" "${RESULT[$name]}"
done
grep -h "weights.published" "$OUT"/runs/*/logs/trainer-0.jsonl 2>/dev/null | tail -1
tail -25 "$OUT/bench_engine.log" 2>/dev/null
