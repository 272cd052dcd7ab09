#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs interscope with the server, dev, plot and data extras, then
# (as root, with apt) Debian's Prometheus for the scrape test. Needs only Python 3.10+ with venv.
# torch is pinned (constraints.txt, shared with the container image) and installed first: 2.13.0
# is the CPU build this project develops against, and an unpinned torch would resolve to a
# multi-GB CUDA build on a CPU-only machine. Progress is pip's own.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
started=$SECONDS
step() { printf '\n== setup: %s (%ds)\n' "$1" "$((SECONDS - started))"; }

if [ ! -x .venv/bin/python ]; then
    step "creating .venv with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=on
step "pip"
.venv/bin/python -m pip install --upgrade pip
step "torch, pinned by constraints.txt ($(grep -E '^torch' constraints.txt))"
.venv/bin/python -m pip install --constraint constraints.txt torch
step "interscope with the server, dev, plot and data extras"
.venv/bin/python -m pip install --constraint constraints.txt ".[server,dev,plot,data]"
step "Prometheus (system binary, for tests/deploy/test_prometheus_scrape.py)"
bash scripts/install-prometheus.sh
step "done: .venv/bin/interscope and .venv/bin/python are ready"
