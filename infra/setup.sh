#!/usr/bin/env bash
# Set up a fresh machine: the Debian Fashion-MNIST package, a .venv with torch/torchvision from the
# machine's disk (pip, never uv/poetry: they would download several GB), then stillroom and its tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}

if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    if [ "$(id -u)" = 0 ]; then
        (apt-get update -q && apt-get install -y -q dataset-fashion-mnist) \
            || echo "setup: could not install dataset-fashion-mnist; set STILLROOM_DATA to the idx files" >&2
    else
        echo "setup: run 'sudo apt-get install -y dataset-fashion-mnist' for the Fashion-MNIST files" >&2
    fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e '.[dev]'
touch .venv/bin/stillroom
