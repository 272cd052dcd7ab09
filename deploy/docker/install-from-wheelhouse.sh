#!/bin/sh
# Runs inside the image build: installs interscope with its server extra into /opt/venv from the
# wheelhouse alone (no index is asked), after checking that the wheelhouse was made for this base
# image's Python; with --gpu, swaps onnxruntime for onnxruntime-gpu from the same wheelhouse.
# Usage (Dockerfile): sh install-from-wheelhouse.sh /wheelhouse [--gpu]
set -eu
wheelhouse=$1
want=$(cat "$wheelhouse/python-version")
have=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$want" != "$have" ]; then
    echo "install-from-wheelhouse: the wheelhouse is for Python $want but this base image has" \
        "$have: rebuild it with scripts/build-wheelhouse.sh --python-version $have" >&2
    exit 1
fi
python3 -m venv /opt/venv
pip() { /opt/venv/bin/python -m pip "$@"; }
export PIP_NO_INDEX=1 PIP_FIND_LINKS="$wheelhouse" PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
pip install "$(ls "$wheelhouse"/interscope-*.whl)[server]"
if [ "${2:-}" = --gpu ]; then
    # Both install the `onnxruntime` module, so they cannot share one environment.
    pip uninstall --yes onnxruntime
    pip install onnxruntime-gpu
fi
pip check
