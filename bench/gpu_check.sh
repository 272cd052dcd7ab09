#!/usr/bin/env bash
# GPU readiness check, never run by the tests: on a CUDA machine with PyPI access, in under five
# minutes, install interscope with the GPU extra into its own venv and run bench/gpu_check.py
# (the paper-scale model through onnxruntime's CUDA and TensorRT providers with IO binding, FP16
# and large batches, against raw torch on CUDA, then a paper-scale Profile through a server).
#   bash bench/gpu_check.sh              # venv in .venv-gpu (VENV=... to choose)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv-gpu}
step() { printf '[gpu_check %(%H:%M:%S)T] %s\n' -1 "$*"; }
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L; then
    echo "gpu_check: no NVIDIA GPU visible (nvidia-smi); run this on a CUDA machine" >&2
    exit 1
fi
step "venv $venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# The same torch pin as everywhere; on a CUDA host with internet pip resolves its CUDA wheel.
step "torch (constraints.txt)"
"$venv/bin/pip" install -q -c constraints.txt torch
step "interscope[server] with onnxruntime-gpu in place of onnxruntime"
"$venv/bin/pip" install -q -c constraints.txt ".[server]"
"$venv/bin/pip" uninstall -q -y onnxruntime
"$venv/bin/pip" install -q ".[gpu]"
step "measuring"
timeout 270 "$venv/bin/python" bench/gpu_check.py "$@"
