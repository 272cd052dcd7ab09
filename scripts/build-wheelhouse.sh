#!/usr/bin/env bash
# Builds the wheelhouse the image installs from, so that `docker build` needs no package index:
# the interscope wheel built from this tree plus every wheel its server extra needs, torch pinned
# by constraints.txt (the release scripts/setup.sh installs for the tests).
#
# Usage: scripts/build-wheelhouse.sh [--gpu] [--match-venv DIR] [--python-version X.Y] [--out DIR]
#   --match-venv DIR     also pin every other package to the version installed in DIR (the venv
#                        the tests ran in), so the image runs exactly what was tested;
#   --gpu                the `gpu` target's wheelhouse: a CUDA build of torch, plus onnxruntime-gpu
#                        (the image swaps it for onnxruntime), for the CUDA base's Python;
#   --python-version     the base image's Python (default: this interpreter's for the cpu target,
#                        3.12 for gpu, the Python of the default Ubuntu 24.04 CUDA base);
#   --out DIR            default ./wheelhouse (cpu) or ./wheelhouse-gpu (gpu); emptied first.
# Environment: PYTHON (whose pip downloads; default .venv/bin/python, else python3);
#   TORCH_VARIANT, the torch build's local version label (cpu, or cu126 with --gpu; empty means
#   PyPI's default build); TORCH_INDEX, where that build is fetched when pip's configured sources
#   lack it (default PyTorch's index for the variant).
set -euo pipefail
cd "$(dirname "$0")/.."

gpu=0 match_venv="" python_version="" out=""
while [ $# -gt 0 ]; do
    case "$1" in
    --gpu) gpu=1 ;;
    --match-venv) match_venv=$2 && shift ;;
    --python-version) python_version=$2 && shift ;;
    --out) out=$2 && shift ;;
    *) echo "build-wheelhouse: unknown argument $1 (see the header of $0)" >&2 && exit 2 ;;
    esac
    shift
done

if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    [ -x .venv/bin/python ] && PYTHON=.venv/bin/python
fi
host_python=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$gpu" = 1 ]; then
    variant=${TORCH_VARIANT-cu126}
    python_version=${python_version:-3.12}
    out=${out:-wheelhouse-gpu}
else
    variant=${TORCH_VARIANT-cpu}
    python_version=${python_version:-$host_python}
    out=${out:-wheelhouse}
fi
torch_index=${TORCH_INDEX:-https://download.pytorch.org/whl/${variant:-cpu}}

torch_version=$(sed -n 's/^torch==\([0-9][0-9.]*\).*/\1/p' constraints.txt)
if [ -z "$torch_version" ]; then
    echo "build-wheelhouse: constraints.txt has no torch==X.Y.Z pin" >&2
    exit 1
fi
torch_spec="torch==${torch_version}${variant:++$variant}"

rm -rf "$out"
mkdir -p "$out"
pins="$out/.constraints.txt"
trap 'rm -f "$pins"' EXIT
grep -v '^torch==' constraints.txt >"$pins"
echo "$torch_spec" >>"$pins"
ort_gpu_spec=onnxruntime-gpu
if [ -n "$match_venv" ]; then
    tested_torch=$("$match_venv/bin/python" -c 'import torch; print(torch.__version__)')
    if [ "${tested_torch%%+*}" != "$torch_version" ]; then
        echo "build-wheelhouse: $match_venv has torch $tested_torch, constraints.txt pins" \
            "$torch_version: rerun scripts/setup.sh" >&2
        exit 1
    fi
    # Every exact pin but ours (interscope is this tree) and torch's (the variant above: the
    # tests run the CPU build, the gpu image needs a CUDA build of the same release).
    "$match_venv/bin/python" -m pip freeze --exclude-editable |
        grep -E '^[A-Za-z0-9._-]+==' | grep -viE '^(interscope|torch)==' >>"$pins"
    ort_version=$(sed -n 's/^onnxruntime==//p' "$pins")
    [ -n "$ort_version" ] && ort_gpu_spec="onnxruntime-gpu==$ort_version"
fi

# Wheels only (no sdist needs a compiler in the image), for the base image's Python: when it is
# not this interpreter's, pip is told the target's tags (manylinux up to glibc 2.34, which both
# Debian bookworm and Ubuntu 24.04 exceed).
target=(--only-binary=:all:)
if [ "$python_version" != "$host_python" ]; then
    abi="cp${python_version/./}"
    target+=(--python-version "$python_version" --implementation cp --abi "$abi" --abi abi3
        --abi none --platform manylinux2014_x86_64)
    for minor in $(seq 17 34); do
        target+=(--platform "manylinux_2_${minor}_x86_64")
    done
fi

echo "== wheelhouse $out: interscope wheel from this tree"
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$out" .
wheel=$(ls "$out"/interscope-*.whl)

echo "== wheelhouse $out: $torch_spec (Python $python_version)"
# pip's configured sources first (a mirror or local wheels may hold the build), then PyTorch's
# index, which is the usual home of the +cpu and +cuXXX builds.
if ! "$PYTHON" -m pip download --quiet --no-deps --dest "$out" "${target[@]}" "$torch_spec"; then
    echo "build-wheelhouse: not in pip's sources; trying $torch_index"
    "$PYTHON" -m pip download --quiet --no-deps --dest "$out" "${target[@]}" \
        --extra-index-url "$torch_index" "$torch_spec"
fi

echo "== wheelhouse $out: the server extra's dependencies"
extra=()
[ "$gpu" = 1 ] && extra=("$ort_gpu_spec")
# --find-links $out: torch's local build is already there, and pip must take that one.
"$PYTHON" -m pip download --quiet --dest "$out" --find-links "$out" --constraint "$pins" \
    "${target[@]}" "$wheel[server]" "${extra[@]}"

echo "$python_version" >"$out/python-version"
count=$(find "$out" -name '*.whl' | wc -l)
echo "build-wheelhouse: $out holds $count wheels, $(du -sh "$out" | cut -f1), for Python" \
    "$python_version: $(cd "$out" && ls torch-*.whl onnxruntime*.whl | tr '\n' ' ')"
