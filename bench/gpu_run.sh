#!/usr/bin/env bash
# On the GPU machine, from the repository root: install the wheels bench/gpu_wheels.sh fetched into a target
# directory (no registry: --no-index; --no-deps: the folder holds exactly what the machine lacks), put it on
# PYTHONPATH and run bench/gpu.py at full scale. Its JSON line, plots and log go to OUT (default: out/gpu).
#
#   OUT=$OUT bash bench/gpu_run.sh [bench/gpu.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.gpu-wheels}
TARGET=${TARGET:-/tmp/stillroom-site}
OUT=${OUT:-out/gpu}
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if (( ${#wheels[@]} == 0 )); then
    echo "gpu_run.sh: error: no wheels in $WHEELS: run bench/gpu_wheels.sh where PyPI is reachable" >&2
    exit 1
fi
mkdir -p "$OUT" "$TARGET"
if "$PYTHON" -m pip --version >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$TARGET" "${wheels[@]}"
else  # no pip: a wheel is a zip of what goes into site-packages
    for w in "${wheels[@]}"; do "$PYTHON" -m zipfile -e "$w" "$TARGET"; done
fi
export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import stillroom, zarr, numcodecs, torch; print('stillroom from', stillroom.__file__, '| zarr',
zarr.__version__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())" | tee "$OUT/env.txt"
nvidia-smi >> "$OUT/env.txt" 2>&1 || true
exec "$PYTHON" bench/gpu.py --scale full --device cuda --out "$OUT" "$@"
