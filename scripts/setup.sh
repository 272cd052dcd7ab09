#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs interscope with the server, dev and plot extras.
# torch is pinned first: 2.13.0 is the CPU build this project develops against, and an unpinned
# torch would resolve to a multi-GB CUDA build on a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet ".[server,dev,plot]"
