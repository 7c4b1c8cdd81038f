#!/usr/bin/env bash
# The prepared GPU check on a machine that has torch but not diffusers/torchao, and no network:
# installs the wheels of WHEEL_DIR (default .whl) into /tmp/site, then runs benchmarks.gpu_check
# from the repository root. Usage: bash benchmarks/gpu_check.sh [WHEEL_DIR] [gpu_check options]
# e.g.  bash benchmarks/gpu_check.sh .whl --out "$OUT/gpu_check.json"
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
wheels=".whl"
if [[ $# -gt 0 && "$1" != -* ]]; then
  wheels="$1"
  shift
fi
if compgen -G "$wheels/*.whl" >/dev/null; then
  site=/tmp/site
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "gpu_check.sh: no wheels in $wheels; using the installed packages" >&2
fi
export PYTHONUNBUFFERED=1
exec "$py" -m benchmarks.gpu_check "$@"
