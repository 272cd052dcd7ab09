"""Fixtures for the model tests: a private copy of the demo repository each test may damage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from interscope_server.models import ModelRepository


@pytest.fixture
def repo_root(demo_repository: Path, tmp_path: Path) -> Path:
    """A writable repository holding digits-cnn and digits-cnn-ts copied from the demo."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("digits-cnn", "digits-cnn-ts"):
        shutil.copytree(demo_repository / name, root / name)
    return root


@pytest.fixture
def repository(repo_root: Path) -> ModelRepository:
    return ModelRepository(repo_root, max_upload_bytes=1_000_000)
