#!/usr/bin/env bash
# One short GPU check (under 8 minutes on one H100/H200: each part has its own time limit, 7.5
# minutes in all, plus a venv install on a bare machine), run from anywhere in the repo:
#   bash benchmarks/gpu_check.sh          # OUT=/tmp/gpu_check; ZOO=auto|full|quick (see below); PY
# 1. equivalence: RESPEC_TEST_DEVICE=cuda pytest tests/engine/test_cuda.py tests/engine/test_model.py:
#    our model vs transformers on CUDA (float32 with TF32 off, bfloat16), KV-cache decoding,
#    engine greedy on CUDA == CPU (plain, chain and tree SD), the weight broadcast between
#    processes (gloo when two ranks share a GPU, NCCL across two GPUs), and
#    configs/qwen2.5-math.toml's RL loop on CUDA in bfloat16 on a tiny random Qwen2 checkpoint;
# 2. rl_steps: 4 RL steps of configs/tiny.toml with model.device="cuda" (weights over NCCL with
#    2+ GPUs, over gloo when trainer and generator share the one GPU);
# 3. bench_engine: transformers generate vs the engine, plain and SD, on CUDA, batches 1/8/64.
# Models for 2 and 3: the default zoo if it is cached, else the micro zoo built in seconds
# (ZOO=full trains the default zoo first: about ten minutes more). Prints one table at the end;
# each part's log is in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
ZOO=${ZOO:-auto}
rm -rf "$OUT/runs" "$OUT/bench_engine.json"
mkdir -p "$OUT"
# PY=python3 uses a Python that already has CUDA torch and the project's dependencies (on a
# machine without a registry: the repo and any carried packages on PYTHONPATH); the default
# makes .venv with PyPI's CUDA torch when it is missing.
PY=${PY:-.venv/bin/python}
if [ "$PY" = .venv/bin/python ] && [ ! -x "$PY" ]; then
  python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q torch && .venv/bin/pip install -q -e '.[test]'
fi
START=$(date +%s)
declare -A RESULT TIME DETAIL

run() {  # name, time limit in seconds, command...
  local name=$1 limit=$2; shift 2
  local start=$(date +%s) code=0
  timeout --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1 || code=$?
  TIME[$name]=$(( $(date +%s) - start ))
  if [ "$code" = 0 ]; then RESULT[$name]=pass
  elif [ "$code" = 124 ] || [ "$code" = 137 ]; then RESULT[$name]="TIMEOUT (${limit}s)"
  else RESULT[$name]="FAIL (rc=$code)"; fi
}

if ! $PY - >"$OUT/device.txt" 2>&1 <<'EOF'
import torch, torch.distributed as dist
assert torch.cuda.is_available(), f"no CUDA in torch {torch.__version__} (a CPU build? make install TORCH=torch)"
nccl = ".".join(map(str, torch.cuda.nccl.version())) if dist.is_nccl_available() else "unavailable"
print(f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, NCCL {nccl}")
EOF
then cat "$OUT/device.txt"; exit 1; fi
cat "$OUT/device.txt"

# 1. Equivalence and CUDA tests.
run equivalence 180 env RESPEC_TEST_DEVICE=cuda $PY -m pytest -q -rs -p no:cacheprovider \
    tests/engine/test_cuda.py tests/engine/test_model.py
DETAIL[equivalence]=$(grep -E "^[0-9]+ (passed|failed|skipped|errors?)|^no tests ran|^(FAILED|ERROR) " "$OUT/equivalence.log" | tail -4 | tr '\n' ' ')

# 2. A few RL steps of the tiny config on CUDA.
ZOO_VARS=$(timeout 30 $PY benchmarks/gpu_check_models.py "$OUT/zoo" --zoo "$ZOO" 2>"$OUT/models.log")
if [ -n "$ZOO_VARS" ]; then
  eval "$ZOO_VARS"
  run rl_steps 120 $PY -m respec_async.cli launch configs/tiny.toml --set model.device=\"cuda\" \
      --set model.path="\"$TARGET\"" --set trainer.num_steps=4 --set run.final_eval=false \
      --set supervisor.live_status=false --set run.root="\"$OUT/runs\""
  DETAIL[rl_steps]=$($PY - "$OUT/runs" "$ZOO" <<'EOF' 2>&1 | tail -1
import json, sys
from pathlib import Path
runs = sorted(Path(sys.argv[1]).glob("*/metrics.jsonl"))
if not runs:
    print("no metrics.jsonl: no RL step ran")
    sys.exit(1)
run_dir = runs[-1].parent
steps = [json.loads(line) for line in runs[-1].read_text().splitlines() if line.strip()]
def events(role):
    path = run_dir / "logs" / f"{role}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
backends = sorted({e.get("backend") for e in events("trainer-0") if e.get("event") == "weights.group_formed"})
devices = {e["role"]: e.get("device") for e in events("supervisor") if e.get("event") in ("trainer.started", "generator.ready")}
sync = sum(s["sync_s"] for s in steps) / max(len(steps), 1)
tok = sum(s["tokens_per_s"] for s in steps) / max(len(steps), 1)
print(f"{len(steps)} steps ({sys.argv[2]} zoo), weights over {'/'.join(map(str, backends))} {sync:.3f}s/step, "
      f"{tok:.0f} tok/s, " + " ".join(f"{role}@{device}" for role, device in sorted(devices.items())))
sys.exit(0 if len(steps) == 4 else 1)
EOF
) || { [ "${RESULT[rl_steps]}" != pass ] || RESULT[rl_steps]="FAIL (not 4 steps)"; }

  # 3. The engine benchmark on CUDA.
  run bench_engine 120 $PY benchmarks/bench_engine.py --device cuda --target "$TARGET" --drafter "$DRAFTER" \
      --batch-sizes 1,8,64 --grid "3,1,3 5,1,5 4,2,6" --new-tokens 64 --repeats 1 --out "$OUT/bench_engine.json"
  DETAIL[bench_engine]=$($PY - "$OUT/bench_engine.json" <<'EOF' 2>&1 | tail -1
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
cells = []
for row in rows:
    plain = row["plain_tokens_per_s"]["wall"]
    hf = row.get("hf_tokens_per_s", {}).get("wall")
    sd = max((v["tokens_per_s"]["wall"] for v in row["sd"].values()), default=0.0)
    cells.append(f"B={row['batch_size']}: plain {plain:.0f} tok/s" + (f" ({plain / hf:.1f}x hf)" if hf else "")
                 + (f", best SD {sd / plain:.2f}x plain" if sd else ""))
print("; ".join(cells))
EOF
)
else
  for name in rl_steps bench_engine; do RESULT[$name]="FAIL (no models, see $OUT/models.log)"; TIME[$name]=0; done
fi

echo
printf "%-13s %-7s %-20s %s\n" check seconds result detail
for name in equivalence rl_steps bench_engine; do
  printf "%-13s %-7s %-20s %s\n" "$name" "${TIME[$name]:-0}" "${RESULT[$name]:-not run}" "${DETAIL[$name]:-}"
done
TOTAL=$(( $(date +%s) - START ))
echo "total ${TOTAL}s (limit 480s) on $(cat "$OUT/device.txt"); logs in $OUT"
for name in equivalence rl_steps bench_engine; do [ "${RESULT[$name]:-}" = pass ] || exit 1; done
