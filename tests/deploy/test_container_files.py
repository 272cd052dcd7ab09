"""The image's inputs agree with the test environment: one torch pin, a context fit for COPY.

The image itself is built and run by .ci/check-container (it needs root and a container engine);
these checks are what can go stale without one.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def _torch_pin() -> str:
    pins = re.findall(r"^torch==([0-9.]+)$", (REPO_ROOT / "constraints.txt").read_text(), re.M)
    assert len(pins) == 1, f"constraints.txt must pin torch exactly once: {pins}"
    return pins[0]


def test_setup_installs_the_torch_the_image_gets() -> None:
    setup = (REPO_ROOT / "scripts" / "setup.sh").read_text()
    uses_constraints = re.search(r"(-c|--constraint)[ =]constraints\.txt", setup) is not None
    literal = re.findall(r"torch==([0-9.]+)", setup)
    assert uses_constraints or literal, "scripts/setup.sh pins no torch"
    assert all(version == _torch_pin() for version in literal), (
        f"scripts/setup.sh installs torch {literal}, constraints.txt (the image) {_torch_pin()}"
    )


def test_the_tests_run_the_pinned_torch() -> None:
    assert torch.__version__.split("+")[0] == _torch_pin()


def test_dockerignore_admits_exactly_what_the_dockerfile_copies() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    # COPY from the context (not --from=stage): the first operand of each.
    sources = set(re.findall(r"^COPY (?!--from)(\S+) \S+$", dockerfile, re.M))
    assert sources == {"deploy/docker/install-from-wheelhouse.sh", "wheelhouse", "wheelhouse-gpu"}
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "**", "everything is excluded first"
    admitted = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert admitted == sources
    for source in sources - {"wheelhouse", "wheelhouse-gpu"}:  # those two are built, not kept
        assert (REPO_ROOT / source).is_file(), source


def test_both_runtime_stages_install_only_from_the_wheelhouse() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "pip install" not in dockerfile, "installs go through install-from-wheelhouse.sh"
    assert "index-url" not in dockerfile
    installer = (REPO_ROOT / "deploy" / "docker" / "install-from-wheelhouse.sh").read_text()
    assert "PIP_NO_INDEX=1" in installer
    runs = re.findall(r"^RUN sh /install-from-wheelhouse\.sh /wheelhouse(.*)$", dockerfile, re.M)
    assert runs == ["", " --gpu"]
