#!/usr/bin/env bash
# Installs Debian's prometheus server so tests/deploy/test_prometheus_scrape.py can scrape a real
# interscope replica; scripts/setup.sh calls it. Best effort by design: without apt, root or a
# package mirror it says so and exits 0, and the test skips saying how to get the binary.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1; then
    echo "install-prometheus: already present: $(command -v prometheus)"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-prometheus: apt-get not available; the Prometheus integration test will skip"
    exit 0
fi

# apt needs root; use sudo only when it works without a password (CI must never prompt).
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "install-prometheus: not root and no passwordless sudo; the Prometheus test will skip"
        exit 0
    fi
fi

export DEBIAN_FRONTEND=noninteractive
# The Debian package pulls in a systemd unit and a web UI; we only use the binary, and the
# postinst does not start a daemon inside a container (no systemd), so nothing listens on 9090.
# --no-install-recommends keeps out prometheus-node-exporter and friends.
if ! "${SUDO[@]}" apt-get update -qq; then
    echo "install-prometheus: apt-get update failed (offline?); the Prometheus test will skip"
    exit 0
fi
if ! "${SUDO[@]}" apt-get install -y -qq --no-install-recommends prometheus; then
    echo "install-prometheus: apt-get install prometheus failed; the Prometheus test will skip"
    exit 0
fi

echo "install-prometheus: installed $(prometheus --version 2>&1 | head -n 1)"
