#!/usr/bin/env bash
# Here, with PyPI: the wheels a bare GPU machine lacks for bench/gpu.py, for CPython 3.12 on manylinux x86-64,
# into .gpu-wheels/ (ignored by git; it travels with the working tree, at most 40 MiB).
#
# The GPU machine has Python 3.12 with torch, torchvision, timm, Pillow, pyarrow, numpy, matplotlib, tqdm, fsspec
# and PyYAML (and what they need: packaging, typing_extensions, filelock, ...). It lacks zarr and numcodecs and
# their needs, pytest (for `pytest -m gpu`) and stillroom itself, built here as a wheel (installed there with
# --no-deps: Ray, FastAPI and the rest of its dependencies are not needed by the in-process paths).
#
#   bash bench/gpu_wheels.sh [DEST]        # PYTHON=... picks the Python whose pip downloads and builds
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu-wheels}
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
LIMIT_MIB=40
# the versions the project is tested with, where this Python has them
pin() { "$PYTHON" -c "import importlib.metadata as m, sys
try: print(f'$1=={m.version(\"$1\")}')
except m.PackageNotFoundError: print('$1')"; }
rm -rf "$DEST"
mkdir -p "$DEST"
"$PYTHON" -m pip download --quiet --dest "$DEST" --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any "$(pin zarr)" "$(pin numcodecs)" "$(pin pytest)"
# what the GPU machine has already: not sent (a lowercase wheel-name prefix each)
for have in numpy packaging typing_extensions pyyaml fsspec tqdm pillow pyarrow filelock jinja2 markupsafe \
            sympy mpmath networkx setuptools huggingface_hub safetensors requests certifi charset_normalizer idna \
            urllib3 matplotlib contourpy cycler fonttools kiwisolver pyparsing python_dateutil six; do
    find "$DEST" -maxdepth 1 -iname "${have}-*.whl" -delete
done
"$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$DEST" .
bytes=$(du -sb "$DEST" | cut -f1)
if (( bytes > LIMIT_MIB * 1024 * 1024 )); then
    echo "gpu_wheels.sh: error: $DEST holds $((bytes / 1048576)) MiB, over the $LIMIT_MIB MiB that can travel" >&2
    exit 1
fi
ls -1 "$DEST"
echo "$DEST: $(ls "$DEST" | wc -l) wheels, $((bytes / 1024)) KiB"
