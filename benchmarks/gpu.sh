#!/usr/bin/env bash
# The accelerator benchmark set, on a machine as it is (under 8 minutes on one H200):
#   OUT=/some/dir bash benchmarks/gpu.sh     # from anywhere; PYTHON=python3 by default
# Uses the machine's own Python and packages (jax with its accelerator, flax,
# optax, orbax-checkpoint, numpy, tqdm) and the project by path (src/); the
# project's pins do not apply. Wheels carried in benchmarks/wheels/ (make
# gpu-wheels) are installed into $OUT/site for what the machine lacks, never
# over what it has. Writes $OUT/gpu_summary.json and gpu_summary.md
# (benchmarks/gpu.py); says what is missing instead of failing halfway.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
command -v "$PY" >/dev/null || { echo "error: $PY not found (set PYTHON=...)"; exit 2; }
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
shopt -s nullglob
wheels=(benchmarks/wheels/*.whl)
if ((${#wheels[@]})); then
  # Only the wheels whose top-level module the machine cannot import.
  need=()
  for w in "${wheels[@]}"; do
    mod=$("$PY" - "$w" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
tops = sorted({n.split("/")[0] for n in names if n.endswith(".py") and ".dist-info" not in n})
print(tops[0].removesuffix(".py") if tops else "")
PY
)
    [[ -n "$mod" ]] && ! "$PY" -c "import $mod" 2>/dev/null && need+=("$w")
  done
  if ((${#need[@]})); then
    echo "installing carried wheels into $OUT/site: ${need[*]}"
    "$PY" -m pip install --quiet --no-index --no-deps --target "$OUT/site" "${need[@]}" \
      && export PYTHONPATH="$OUT/site:$PYTHONPATH" \
      || echo "warning: the carried wheels did not install; going on without them"
  fi
fi
exec "$PY" benchmarks/gpu.py --out "$OUT" "$@"
