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

# PostgreSQL server binaries (initdb, pg_ctl in /usr/lib/postgresql/*/bin): the tests start a server of
# their own to run the job service on PostgreSQL too (they skip, saying why, without them)
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql) \
            || echo "setup: could not install postgresql; the PostgreSQL tests will be skipped" >&2
    else
        echo "setup: run 'sudo apt-get install -y postgresql' for the PostgreSQL tests" >&2
    fi
fi

# Chromium, headless: the page test opens / in a real browser and takes its screenshot (it skips, saying
# why, without it)
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
            || echo "setup: could not install chromium; the page's browser test will be skipped" >&2
    else
        echo "setup: run 'sudo apt-get install -y chromium' for the page's browser test" >&2
    fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
# s3: s3fs for s3:// stores; dev brings moto's S3 server, which the object-storage tests start on 127.0.0.1.
# infra/constraints.txt pins the versions last tested (`pip freeze`): without it pip's resolver spends about
# 16 minutes of CPU backtracking through this dependency tree; with it, seconds
.venv/bin/python -m pip install -q -c infra/constraints.txt -e '.[dev,postgres,s3]'
touch .venv/bin/stillroom
