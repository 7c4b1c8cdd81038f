#!/usr/bin/env bash
# The one GPU script: run it first whenever a GPU is at hand. From the repository root:
#
#   bash benchmarks/gpu_bench.sh                 # H100/H200: full preset, 1024², 28 steps, 8-minute budget
#   bash benchmarks/gpu_bench.sh --dry-run       # CPU: tiny preset, 2 steps, same phases (CI runs this)
#
# Phases, in priority order (a phase starts only if its minimum fits in what is left of --budget-s):
#   0. wheels: installs .whl/*.whl (make gpu-wheels) into a temp site dir, unless diffusers and torchao
#      already import (CPU machines, CI);
#   1. pytest -m gpu, capped at PYTEST_S;
#   2. kontext bench, sequential: the baseline and the contestants in CONTESTANTS order, each skipped
#      when the previous one's time no longer fits (JSON rewritten after each contestant);
#   3. benchmarks/cold_start.py: 9 shape keys from fresh processes, without and with the compile cache;
#   4. benchmarks/attention_bench.py, if it exists (Triton attention vs SDPA);
#   5. benchmarks/gpu_report.py: the table and the goals, PASS/SHORT.
# Results: benchmarks/results/<gpu>/<date>/ (and copied into $OUT when set, for the device tool).
# Any option can be overridden, e.g. --contestants diffusers,torch-fp8+static --skip-pytest --skip-cold-start
# --skip-attention (a second session measures what the first one's budget dropped); --results-root DIR
# writes elsewhere (the CI dry run writes to a temp folder); COMPILE_CACHE=DIR moves the compile cache.
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

budget=480 model=full device=cuda steps=28 buckets=1024x1024 repeats=2 warmup=1 wheels=.whl
contestants="diffusers,torch-fp8,torch-fp8+graphs,torch-fp8+qkv+graphs,torch-fp8+all,torch-fp8+static"
contestants+=",torch-fp8+attn-fp8-block,torch-fp8+attn-bf16,torch-compile,torch-fp8+qkv+graphs+vae"
profile="torch-fp8"
cold_levers="dynamic" cold_mode="fp8" cold_steps=28
pytest_s=90 bench_min=120 cold_min=120 attention_s=90 skip_pytest=0 skip_cold=0 skip_attention=0
dry_run=0 results_root=benchmarks/results
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --budget-s) budget="$2"; shift ;;
    --model) model="$2"; shift ;;
    --device) device="$2"; shift ;;
    --steps) steps="$2"; shift ;;
    --buckets) buckets="$2"; shift ;;
    --repeats) repeats="$2"; shift ;;
    --contestants) contestants="$2"; shift ;;
    --wheels) wheels="$2"; shift ;;
    --skip-pytest) skip_pytest=1 ;;
    --skip-cold-start) skip_cold=1 ;;
    --skip-attention) skip_attention=1 ;;
    --results-root) results_root="$2"; shift ;;
    *) echo "gpu_bench.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [[ $dry_run == 1 ]]; then  # the same phases, CPU-sized: CI runs this so the script cannot rot
  model=tiny device=cpu steps=2 buckets=128x128 repeats=1 warmup=1 budget="${DRY_RUN_BUDGET_S:-170}"
  contestants="diffusers,torch-eager,torch-eager+qkv,torch-fp8" profile="torch-eager-fp32+qkv"
  cold_levers="" cold_mode="eager" cold_steps=2 pytest_s=90 bench_min=20 cold_min=20 attention_s=15
fi

start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }
log() { echo "== gpu_bench [$((SECONDS - start)) s] $*"; }

# 0. wheels -----------------------------------------------------------------------------------------
if "$py" -c "import diffusers, torchao" 2>/dev/null; then
  log "diffusers and torchao import: no wheels to install"
elif compgen -G "$wheels/*.whl" >/dev/null; then
  site=$(mktemp -d /tmp/kontext-site.XXXXXX)
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$wheels"/*.whl || { echo "gpu_bench.sh: installing $wheels failed" >&2; exit 2; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  log "installed $(ls "$wheels"/*.whl | wc -l) wheels from $wheels"
else
  echo "gpu_bench.sh: diffusers/torchao missing and no wheels in $wheels: run 'make gpu-wheels' here" >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

results=$("$py" - "$device" "$results_root" <<'EOF'
import sys
from datetime import datetime
import torch
from engine.bench.machine import device_name, slug
print(f"{sys.argv[2]}/{slug(device_name(torch.device(sys.argv[1])))}/{datetime.now():%Y-%m-%d}")
EOF
) || { echo "gpu_bench.sh: cannot name the device $device" >&2; exit 2; }
mkdir -p "$results"
log "results in $results; budget ${budget} s"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee "$results/versions.txt"

# 1. pytest -m gpu ----------------------------------------------------------------------------------
if [[ $skip_pytest == 0 && $(left) -gt $((pytest_s + bench_min)) ]]; then
  log "pytest -m gpu (cap ${pytest_s} s)"
  # --continue-on-collection-errors: a test module needing a package the GPU image lacks (fastapi...)
  # must not stop the GPU tests of the others.
  # pytest-timeout (in the GPU image) stops one hanging test instead of the whole phase.
  per_test=()
  "$py" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 45)
  timeout -k 5 "$pytest_s" "$py" -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors \
    "${per_test[@]}" tests/test_torch_backend.py tests >"$results/pytest_gpu.txt" 2>&1  # ours first
  echo "exit status $?" >>"$results/pytest_gpu.txt"
  tail -n 5 "$results/pytest_gpu.txt"
else
  log "pytest -m gpu skipped"
fi

# 2. the benchmark ----------------------------------------------------------------------------------
reserve=$((skip_cold ? 10 : cold_min + 10))
bench_deadline=$(($(left) - reserve))
if [[ $bench_deadline -ge $bench_min ]]; then
  log "kontext bench --model $model (deadline ${bench_deadline} s)"
  timeout -k 10 $((bench_deadline + 90)) "$py" benchmarks/bench.py --model "$model" --device "$device" \
    --steps "$steps" --buckets "$buckets" --repeats "$repeats" --warmup "$warmup" --schedule sequential \
    --deadline-s "$bench_deadline" --contestants "$contestants" --profile "$profile" \
    --out "$results_root" --no-progress 2>&1 | tee "$results/bench.log" | grep -v "^\(W\|I\)[0-9]"
else
  log "bench skipped: ${bench_deadline} s left for it"
fi

# 3. cold start -------------------------------------------------------------------------------------
cold_deadline=$(($(left) - 15))
if [[ $skip_cold == 0 && $cold_deadline -ge $cold_min ]]; then
  log "cold start: $cold_mode ${cold_levers:--} from fresh processes (deadline ${cold_deadline} s)"
  timeout -k 10 $((cold_deadline + 20)) "$py" -m benchmarks.cold_start --model "$model" --device "$device" \
    --torch-mode "$cold_mode" --levers "$cold_levers" --steps "$cold_steps" \
    --cache-dir "${COMPILE_CACHE:-build/$model/compile-cache}" --out "$results/cold_start.json" --deadline-s "$cold_deadline"
else
  log "cold start skipped: ${cold_deadline} s left"
fi

# 4. attention kernel benchmark (benchmarks/attention_bench.py, the kernel's own; run only if present) -
if [[ $skip_attention == 0 && -f benchmarks/attention_bench.py && $(left) -gt 20 ]]; then
  a=$(($(left) - 10)); a=$((a < attention_s ? a : attention_s))
  log "attention_bench (deadline ${a} s)"
  timeout -k 5 $((a + 15)) "$py" -m benchmarks.attention_bench --out "$results/attention.json" --deadline-s "$a" \
    --device "$device"
else
  log "attention_bench skipped (absent or no time)"
fi

# 5. report -----------------------------------------------------------------------------------------
log "report"
"$py" -m benchmarks.gpu_report "$results"
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT/results"
  for f in "$results"/summary.txt "$results"/goals.json "$results"/cold_start.json "$results"/attention.json \
    "$results"/pytest_gpu.txt "$(ls -t "$results"/*.jsonl 2>/dev/null | head -1)" \
    "$(ls -t "$results"/*-profile.txt 2>/dev/null | head -1)" "$results"/bench.log; do
    [[ -f "$f" ]] && cp "$f" "$OUT/results/"
  done
  log "copied to $OUT/results"
fi
log "done in $((SECONDS - start)) s"
