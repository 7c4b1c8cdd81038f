#!/usr/bin/env bash
# The one GPU script: run it first whenever a GPU is at hand (docs/gpu.md: with the device tool). From the
# repository root:
#
#   bash benchmarks/gpu_bench.sh                       # H100/H200: full preset, 1024², 28 steps, 540 s
#   bash benchmarks/gpu_bench.sh --device-left-s 780   # the budget from the device time left (phases.py)
#   bash benchmarks/gpu_bench.sh --dry-run             # CPU: tiny preset, 2 steps, same phases (make rehearse)
#
# One absolute budget (--budget-s), counted from this script's start, shared by the phases in priority
# order (benchmarks/phases.py: each starts only if its minimum fits after the later phases' minimums are
# reserved; each is killed at its deadline, so the script ends inside its budget):
#   0. start-up: installs .whl/*.whl (make gpu-wheels) into a temp site dir unless diffusers and torchao
#      already import (CPU machines); then ONE process (benchmarks/preflight.py): every import and the
#      names the code calls, the versions, the results folder, the contestant names;
#   1. headline: kontext bench of HEADLINE (diffusers, torch-fp8, the best-guess fastest), sequential;
#   2. cold: benchmarks/cold_start.py, every shape key from fresh processes, without and with the cache;
#   3. memory: benchmarks.memory_phase, the memory plans at --vram 24 and 16 GiB (when the module exists);
#   4. rest: kontext bench of every headline contestant left without a result, then the step-cached
#      contestants, then the others; the --profile run is its last contestant (CUPTI after the captures);
#   5. attention: benchmarks/attention_bench.py (Triton attention vs SDPA).
# No report and no pytest here: the report is made from the returned files on a CPU (docs/gpu.md:
# `python -m benchmarks.gpu_report FOLDER --all`). The dry run checks its own files at the end
# (benchmarks/results_check.py) and exits 1 on an error row, a failed, killed or skipped phase, or a
# module that exists but does not import.
# Results: $OUT/results/<gpu>/<start date>/ when OUT is set (the device tool brings back only $OUT: written
# there as they are made), else benchmarks/results/<gpu>/<start date>/.
# Options, e.g. --contestants torch-fp8+static --cached "" --skip-cold-start --skip-attention (a second
# session measures what the first one's budget dropped); --results-root DIR writes elsewhere;
# COMPILE_CACHE=DIR moves the compile cache.
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
start=$SECONDS
day=$(date +%F)  # the results folder's date: the start's, however late the run ends

budget="" device_left="" warm="" model=full device=cuda steps=28 buckets=1024x1024 repeats=3 warmup=1
wheels=.whl
headline="diffusers,torch-fp8,torch-fp8+qkv+graphs"
# Step caches over the fastest torch path (engine/caching, presets): they skip transformer passes, so
# they never count for a no-skip goal (engine/bench/goals.py gives them their own lines).
cached="torch-fp8+qkv+cache=magcache-kontext,torch-fp8+qkv+cache=fbc"
contestants="torch-fp8+graphs,torch-fp8+static,torch-fp8+attn-fp8-block,torch-fp8+attn-bf16,torch-compile"
contestants+=",torch-fp8+qkv+graphs+vae,torch-fp8+all"
profile="torch-fp8+all"  # the rest's last contestant: its profiler starts after every graph capture
# Several GPUs: one edit split over all of them too (engine.distributed, NCCL), in the rest phase, right
# after the one-GPU contestants it is compared with. Never run: no machine so far had more than one GPU.
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
[[ ${gpus:-0} -ge 2 ]] && contestants="torch-fp8+cp${gpus},torch-eager+cp${gpus},$contestants"
cold_levers="dynamic" cold_mode="fp8" cold_steps=28 cold_keys=()
vram="24,16"
# name:minimum:cap seconds, in priority order (see benchmarks/phases.py and docs/gpu.md's table)
phases="headline:150:0,cold:170:210,memory:45:75,rest:90:0,attention:20:40"
skip_cold=0 skip_attention=0 skip_memory=0 dry_run=0
results_root="${OUT:+$OUT/results}"
results_root="${results_root:-benchmarks/results}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --budget-s) budget="$2"; shift ;;
    --device-left-s) device_left="$2"; shift ;;
    --warm) warm="--warm" ;;
    --model) model="$2"; shift ;;
    --device) device="$2"; shift ;;
    --steps) steps="$2"; shift ;;
    --buckets) buckets="$2"; shift ;;
    --repeats) repeats="$2"; shift ;;
    --headline) headline="$2"; shift ;;
    --contestants) contestants="$2"; shift ;;
    --cached) cached="$2"; shift ;;
    --wheels) wheels="$2"; shift ;;
    --skip-cold-start) skip_cold=1 ;;
    --skip-attention) skip_attention=1 ;;
    --skip-memory) skip_memory=1 ;;
    --results-root) results_root="$2"; shift ;;
    *) echo "gpu_bench.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
attention_args=(--device cuda)
memory_args=(--model full)
if [[ $dry_run == 1 ]]; then  # the same phases, CPU-sized: `make rehearse` runs this so the script cannot rot
  model=tiny device=cpu steps=2 buckets=128x128 repeats=1 warmup=1 budget="${DRY_RUN_BUDGET_S:-1800}"
  headline="diffusers,torch-eager,torch-fp8"
  cached="torch-eager+qkv+cache=magcache-kontext,torch-eager+qkv+cache=fbc"
  contestants="torch-eager-bf16,torch-eager+qkv" profile="torch-eager-fp32+qkv"
  cold_levers="" cold_mode="compile" cold_steps=2 cold_keys=(--one-key)  # compiles, saves, loads: one key
  phases="headline:20:0,cold:40:0,memory:10:60,rest:20:0,attention:10:40"
  attention_args=(--device cpu --shape tiny) memory_args=(--model tiny --dry-run)
fi
if [[ -z $budget ]]; then
  if [[ -n $device_left ]]; then
    budget=$("$py" -m benchmarks.phases budget "$device_left" $warm) || exit 2
  else
    budget=$("$py" -c "from benchmarks.phases import DEFAULT_BUDGET_S; print(DEFAULT_BUDGET_S)") || exit 2
  fi
fi
drop_phase() { phases=$(echo ",$phases," | sed "s/,$1:[0-9]*:[0-9]*,/,/; s/^,//; s/,$//"); }
[[ $skip_cold == 1 ]] && drop_phase cold
[[ $skip_attention == 1 ]] && drop_phase attention
[[ $skip_memory == 1 ]] && drop_phase memory
[[ -z $headline ]] && drop_phase headline  # --headline "": a second session's rest phase only

log() { echo "== gpu_bench [$((SECONDS - start)) s of ${budget} s] $*"; }
failed=()   # what makes a dry run exit 1 (on a GPU the results still count: logged only)
fail() { failed+=("$1"); log "FAILED: $1"; }
# slot NAME -> sets $secs (0: skip) and logs the plan's reason
slot() {
  local out
  # +1: SECONDS counts whole seconds, and the planner's own start-up comes out of the phase's time
  out=$("$py" -m benchmarks.phases "$budget" $((SECONDS - start + 1)) "$1" "$phases") || out="0 planner failed"
  secs=${out%% *}
  log "$1: ${out#* }"
  if [[ $secs == 0 && $dry_run == 1 ]]; then fail "$1 skipped by the budget (DRY_RUN_BUDGET_S=$budget)"; fi
}
# run_phase SECONDS CMD...: asked to stop 5 s before its deadline, killed at it (phases.KILL_GRACE_S)
run_phase() { local s=$1; shift; timeout -k 5 $((s > 6 ? s - 5 : 1)) "$@"; }
# check NAME STATUS: 124/137 is the phase's deadline (the budget's call on a GPU, a failure in a dry run)
check() {
  if [[ $2 == 124 || $2 == 137 ]]; then
    if [[ $dry_run == 1 ]]; then fail "$1 killed at its deadline"; else log "$1 stopped at its deadline"; fi
  elif [[ $2 != 0 ]]; then
    fail "$1 (exit $2)"
  fi
}

# 0. wheels, then the preflight: one process, one torch import -------------------------------------------
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
pre=$("$py" -m benchmarks.preflight --device "$device" --results-root "$results_root" --day "$day" \
  --contestants "$cached,$contestants" --optional benchmarks.memory_phase --optional engine.caching) \
  || { echo "$pre"; echo "gpu_bench.sh: the preflight failed (above)" >&2; exit 2; }
echo "$pre"
field() { sed -n "s/^$1: //p" <<<"$pre"; }
results=$(field results)
accepted=",$(field contestants),"
memory_module=$(field "optional benchmarks.memory_phase")
caching_module=$(field "optional engine.caching")
mkdir -p "$results"
since=$(date +%s)
log "results in $results"
# keep NAMES: those of the comma list the preflight accepted
keep() { local n out=""; for n in ${1//,/ }; do [[ $accepted == *",$n,"* ]] && out+="${out:+,}$n"; done; echo "$out"; }
while read -r line; do  # "refused NAME: why"
  [[ -z $line ]] && continue
  name=${line#refused }; name=${name%%: *}
  if [[ $name == *"+cache="* && $caching_module == absent ]]; then
    log "dropped $name: engine/caching is not in this checkout (the step caches' branch)"
  elif [[ $dry_run == 1 ]]; then
    fail "contestant ${line#refused }"
  else
    log "dropped ${line#refused }"
  fi
done <<<"$(grep '^refused ' <<<"$pre")"
cached=$(keep "$cached") contestants=$(keep "$contestants")
case $memory_module in
  ok) ;;
  absent) log "memory: benchmarks/memory_phase.py is not in this checkout: no memory phase"; drop_phase memory ;;
  *) if [[ $dry_run == 1 ]]; then fail "benchmarks.memory_phase: $memory_module"; else log "memory: $memory_module"; fi
     drop_phase memory ;;
esac

# bench_phase NAME CONTESTANTS [PROFILE]: kontext bench, sequential, its deadline from its process start
bench_phase() {
  slot "$1"
  if [[ $secs -gt 0 ]]; then
    local deadline=$((secs > 30 ? secs * 85 / 100 : secs - 5))  # the rest: one contestant's overrun
    log "kontext bench --model $model: $2 (deadline ${deadline} s from its start, killed at ${secs} s)"
    run_phase "$secs" "$py" benchmarks/bench.py --model "$model" --device "$device" \
      --steps "$steps" --buckets "$buckets" --repeats "$repeats" --warmup "$warmup" --schedule sequential \
      --deadline-s "$deadline" --contestants "$2" --profile "${3:-}" \
      --results-dir "$results" --no-progress 2>&1 | tee -a "$results/bench-$1.log" | grep -v "^\(W\|I\)[0-9]"
    check "$1" "${PIPESTATUS[0]}"
  fi
}

# 1. the headline ---------------------------------------------------------------------------------------
[[ $phases == *headline:* ]] && bench_phase headline "$headline"

# 2. cold start -----------------------------------------------------------------------------------------
if [[ $phases == *cold:* ]]; then
  slot cold
  if [[ $secs -gt 0 ]]; then
    run_phase "$secs" "$py" -m benchmarks.cold_start --model "$model" --device "$device" \
      --torch-mode "$cold_mode" --levers "$cold_levers" --steps "$cold_steps" "${cold_keys[@]}" \
      --cache-dir "${COMPILE_CACHE:-build/$model/compile-cache}" --out "$results/cold_start.json" \
      --deadline-s $((secs - 10))
    check cold $?
  fi
fi

# 3. memory plans ---------------------------------------------------------------------------------------
if [[ $phases == *memory:* ]]; then
  slot memory
  if [[ $secs -gt 0 ]]; then
    run_phase "$secs" "$py" -m benchmarks.memory_phase "${memory_args[@]}" --vram "$vram" \
      --results "$results" --deadline-s $((secs - 10 > 5 ? secs - 10 : 5))
    check memory $?
  fi
fi

# 4. the rest: headline contestants left without a result first, then the step-cached, then the others --
missed=""
[[ -n $headline ]] && { missed=$("$py" -m benchmarks.results_check missing "$results" "$since" "$headline") || missed=""; }
[[ -n $missed ]] && log "headline contestants without a result, first in the rest: $missed"
rest=$(echo "$missed,$cached,$contestants" | tr ',' '\n' | awk 'NF && !seen[$0]++' | paste -sd, -)
if [[ -n $rest ]]; then
  bench_phase rest "$rest" "$profile"
else
  log "rest: no contestants"
fi

# 5. attention kernel benchmark -------------------------------------------------------------------------
if [[ $phases == *attention:* ]]; then
  slot attention
  if [[ $secs -gt 0 ]]; then
    run_phase "$secs" "$py" -m benchmarks.attention_bench --out "$results/attention.json" \
      --deadline-s $((secs - 10 > 5 ? secs - 10 : 5)) "${attention_args[@]}"
    check attention $?
  fi
fi

if [[ $dry_run == 1 ]]; then  # every file the run wrote, read back: an error row fails the dry run
  log "checking the results (benchmarks/results_check.py)"
  "$py" -m benchmarks.results_check errors "$results" "$since" || fail "error rows in $results (above)"
fi
elapsed=$((SECONDS - start))
log "done in ${elapsed} s of a ${budget} s budget ($([[ $elapsed -le $budget ]] && echo within || echo OVER))"
log "the report, on any machine: python -m benchmarks.gpu_report $results --all"
if [[ ${#failed[@]} -gt 0 ]]; then
  log "failed: $(IFS=';'; echo "${failed[*]}")"
  [[ $dry_run == 1 ]] && exit 1
fi
exit 0
