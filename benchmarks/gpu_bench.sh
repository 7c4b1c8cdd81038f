#!/usr/bin/env bash
# The one GPU script: run it first whenever a GPU is at hand. From the repository root:
#
#   bash benchmarks/gpu_bench.sh                 # H100/H200: full preset, 1024², 28 steps, 8-minute budget
#   bash benchmarks/gpu_bench.sh --dry-run       # CPU: tiny preset, 2 steps, same phases (CI runs this)
#
# One absolute budget (--budget-s), counted from this script's start, shared by the phases in priority
# order (benchmarks/phases.py: each starts only if its minimum fits after the later phases' minimums are
# reserved; each is killed at its deadline, so the script ends inside its budget):
#   0. wheels: installs .whl/*.whl (make gpu-wheels) into a temp site dir unless diffusers and torchao
#      already import (CPU machines, CI); then the import preflight (benchmarks/preflight.py), in seconds;
#   1. headline: kontext bench of HEADLINE (diffusers, torch-fp8, the best-guess fastest), sequential;
#   2. cold: benchmarks/cold_start.py, 9 shape keys from fresh processes, without and with the cache;
#   3. rest: kontext bench of the other contestants (ratios against phase 1's diffusers in the report);
#   4. attention: benchmarks/attention_bench.py (Triton attention vs SDPA);
#   5. report: benchmarks/gpu_report.py, the tables of 1 and 3, the goals, PASS/SHORT;
#   6. pytest -m gpu, last, capped.
# Results: $OUT/results/<gpu>/<date>/ when OUT is set (the device tool brings back only $OUT: written
# there as they are made, nothing is copied at the end), else benchmarks/results/<gpu>/<date>/.
# Options, e.g. --contestants torch-fp8+static --skip-pytest --skip-cold-start --skip-attention (a second
# session measures what the first one's budget dropped); --results-root DIR writes elsewhere;
# COMPILE_CACHE=DIR moves the compile cache.
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
start=$SECONDS

budget=480 model=full device=cuda steps=28 buckets=1024x1024 repeats=3 warmup=1 wheels=.whl
headline="diffusers,torch-fp8,torch-fp8+qkv+graphs"
contestants="torch-fp8+graphs,torch-fp8+all,torch-fp8+static,torch-fp8+attn-fp8-block,torch-fp8+attn-bf16"
contestants+=",torch-compile,torch-fp8+qkv+graphs+vae"
# Several GPUs: one edit split over all of them too (engine.distributed, NCCL), in the rest phase, right
# after the one-GPU contestants it is compared with. Never run: no machine so far had more than one GPU.
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
[[ ${gpus:-0} -ge 2 ]] && contestants="torch-fp8+cp${gpus},torch-eager+cp${gpus},$contestants"
profile="torch-fp8"
cold_levers="dynamic" cold_mode="fp8" cold_steps=28
# name:minimum:cap seconds, in priority order (see benchmarks/phases.py)
phases="headline:150:0,cold:90:160,rest:90:0,attention:20:90,report:10:15,pytest:10:30"
skip_pytest=0 skip_cold=0 skip_attention=0 dry_run=0
results_root="${OUT:+$OUT/results}"
results_root="${results_root:-benchmarks/results}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --budget-s) budget="$2"; shift ;;
    --model) model="$2"; shift ;;
    --device) device="$2"; shift ;;
    --steps) steps="$2"; shift ;;
    --buckets) buckets="$2"; shift ;;
    --repeats) repeats="$2"; shift ;;
    --headline) headline="$2"; shift ;;
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
attention_shape=()
if [[ $dry_run == 1 ]]; then  # the same phases, CPU-sized: CI runs this so the script cannot rot
  model=tiny device=cpu steps=2 buckets=128x128 repeats=1 warmup=1 budget="${DRY_RUN_BUDGET_S:-240}"
  headline="diffusers,torch-eager,torch-fp8" contestants="torch-eager+qkv,torch-eager-bf16"
  profile="torch-eager-fp32+qkv" cold_levers="" cold_mode="eager" cold_steps=2
  phases="headline:20:0,cold:20:0,rest:20:0,attention:10:40,report:5:20,pytest:10:30"
  attention_shape=(--shape tiny)
fi
[[ $skip_cold == 1 ]] && phases=$(echo "$phases" | sed 's/cold:[0-9]*:[0-9]*,//')
[[ $skip_attention == 1 ]] && phases=$(echo "$phases" | sed 's/attention:[0-9]*:[0-9]*,//')
[[ $skip_pytest == 1 ]] && phases=$(echo "$phases" | sed 's/,pytest:[0-9]*:[0-9]*//')
[[ -z $contestants ]] && phases=$(echo "$phases" | sed 's/rest:[0-9]*:[0-9]*,//')  # --contestants ""

log() { echo "== gpu_bench [$((SECONDS - start)) s of ${budget} s] $*"; }
# slot NAME -> sets $secs (0: skip) and logs the plan's reason
slot() {
  local out
  # +1: SECONDS counts whole seconds, and the planner's own start-up comes out of the phase's time
  out=$("$py" -m benchmarks.phases "$budget" $((SECONDS - start + 1)) "$1" "$phases") || out="0 planner failed"
  secs=${out%% *}
  log "$1: ${out#* }"
}
# run_phase SECONDS CMD...: asked to stop 5 s before its deadline, killed at it (phases.KILL_GRACE_S)
run_phase() { local s=$1; shift; timeout -k 5 $((s > 6 ? s - 5 : 1)) "$@"; }
failed=()  # phases whose process failed (a deadline stop, 124, is not a failure: the budget decided)
check() { [[ $2 == 0 || $2 == 124 ]] || { failed+=("$1 (exit $2)"); log "$1 FAILED with exit status $2"; }; }

# 0. wheels, then every import checked ---------------------------------------------------------------
if "$py" -c "import diffusers, torchao" 2>/dev/null; then
  log "diffusers and torchao import: no wheels to install"
elif compgen -G "$wheels/*.whl" >/dev/null; then
  site=$(mktemp -d "${TMPDIR:-/tmp}/kontext-site.XXXXXX")
  trap 'rm -rf "$site"' EXIT
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$wheels"/*.whl || { echo "gpu_bench.sh: installing $wheels failed" >&2; exit 2; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  log "installed $(ls "$wheels"/*.whl | wc -l) wheels from $wheels"
else
  echo "gpu_bench.sh: diffusers/torchao missing and no wheels in $wheels: run 'make gpu-wheels' here" >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$py" -m benchmarks.preflight || exit 2

results=$("$py" - "$device" "$results_root" <<'EOF'
import sys
from datetime import datetime
import torch
from engine.bench.machine import device_name, slug
print(f"{sys.argv[2]}/{slug(device_name(torch.device(sys.argv[1])))}/{datetime.now():%Y-%m-%d}")
EOF
) || { echo "gpu_bench.sh: cannot name the device $device" >&2; exit 2; }
mkdir -p "$results"
since=$(date +%s)
log "results in $results"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee "$results/versions.txt"

# bench_phase NAME CONTESTANTS: kontext bench, sequential, its deadline counted from its process start
bench_phase() {
  slot "$1"
  if [[ $secs -gt 0 ]]; then
    local deadline=$((secs > 30 ? secs * 85 / 100 : secs - 5))  # the rest: one contestant's overrun
    log "kontext bench --model $model: $2 (deadline ${deadline} s from its start, killed at ${secs} s)"
    run_phase "$secs" "$py" benchmarks/bench.py --model "$model" --device "$device" \
      --steps "$steps" --buckets "$buckets" --repeats "$repeats" --warmup "$warmup" --schedule sequential \
      --deadline-s "$deadline" --contestants "$2" --profile "$profile" \
      --out "$results_root" --no-progress 2>&1 | tee -a "$results/bench-$1.log" | grep -v "^\(W\|I\)[0-9]"
    check "$1" "${PIPESTATUS[0]}"
  fi
}

# 1. the headline ---------------------------------------------------------------------------------------
bench_phase headline "$headline"

# 2. cold start -----------------------------------------------------------------------------------------
if [[ $skip_cold == 0 ]]; then
  slot cold
  if [[ $secs -gt 0 ]]; then
    run_phase "$secs" "$py" -m benchmarks.cold_start --model "$model" --device "$device" \
      --torch-mode "$cold_mode" --levers "$cold_levers" --steps "$cold_steps" \
      --cache-dir "${COMPILE_CACHE:-build/$model/compile-cache}" --out "$results/cold_start.json" \
      --deadline-s $((secs - 10))
    check cold $?
  fi
fi

# 3. the other contestants ------------------------------------------------------------------------------
[[ -n $contestants ]] && bench_phase rest "$contestants"

# 4. attention kernel benchmark -------------------------------------------------------------------------
if [[ $skip_attention == 0 ]]; then
  slot attention
  if [[ $secs -gt 0 ]]; then
    run_phase "$secs" "$py" -m benchmarks.attention_bench --out "$results/attention.json" \
      --deadline-s $((secs - 10 > 5 ? secs - 10 : 5)) --device "$device" "${attention_shape[@]}"
  fi
fi

# 5. report ---------------------------------------------------------------------------------------------
slot report
if [[ $secs -gt 0 ]]; then
  run_phase "$secs" "$py" -m benchmarks.gpu_report "$results" --since "$since"
  check report $?
fi

# 6. pytest -m gpu, last --------------------------------------------------------------------------------
if [[ $skip_pytest == 0 ]]; then
  slot pytest
  if [[ $secs -gt 0 ]]; then
    # --continue-on-collection-errors: a test module needing a package the GPU image lacks (fastapi...)
    # must not stop the GPU tests of the others; pytest-timeout (in the GPU image) stops one hanging test.
    per_test=()
    "$py" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 20)
    run_phase "$secs" "$py" -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors \
      "${per_test[@]}" tests/test_torch_backend.py tests >"$results/pytest_gpu.txt" 2>&1
    echo "exit status $?" >>"$results/pytest_gpu.txt"
    tail -n 3 "$results/pytest_gpu.txt"
  fi
fi
elapsed=$((SECONDS - start))
log "done in ${elapsed} s of a ${budget} s budget ($([[ $elapsed -le $budget ]] && echo within || echo OVER))"
if [[ ${#failed[@]} -gt 0 ]]; then
  log "failed phases: ${failed[*]} (results so far are in $results)"
  [[ $dry_run == 1 ]] && exit 1  # CI: the script must not rot; on a GPU the results still count
fi
