"""The committed stubs equal a fresh generation, and the check fails when a .proto changes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _copy_tree(tmp_path: Path) -> Path:
    """The parts of the repository the generator reads and writes, in a scratch copy."""
    copy = tmp_path / "repo"
    for part in ("proto", "scripts", "client/interscope/v1", "client/interscope/oip/v2"):
        shutil.copytree(ROOT / part, copy / part)
    return copy


def _check(repo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(repo / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    done = _check(_copy_tree(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "up to date" in done.stdout


def test_check_fails_when_a_proto_changes_without_regeneration(tmp_path: Path) -> None:
    repo = _copy_tree(tmp_path)
    proto = repo / "proto" / "interscope" / "v1" / "models.proto"
    proto.write_text(
        proto.read_text().replace(
            "message UnloadModelResponse {}",
            "message UnloadModelResponse {\n  // New field, stubs not regenerated.\n"
            "  bool was_loaded = 1;\n}",
        )
    )
    done = _check(repo)
    assert done.returncode == 1
    assert "models_pb2.py" in done.stdout and "stale" in done.stdout
