"""Sharded audits (as a Kubernetes Indexed Job runs them) merge into the unsharded audit's
report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import interscope
from interscope.cli import main
from interscope_server.server import BackgroundServer

SHARDS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, digits: tuple[np.ndarray, np.ndarray]) -> Path:
    x, y = digits
    path = tmp_path_factory.mktemp("shards") / "digits.npz"
    np.savez(path, x=x[:10], y=y[:10])  # 10 over 3 shards: 4, 3, 3 samples
    return path


def _audit_argv(address: str, data: Path, *extra: str) -> list[str]:
    return [
        "audit",
        "--address",
        address,
        "--model",
        "digits-cnn",
        "--data",
        str(data),
        "--attack",
        "pgd",
        "--eps",
        "0.1",
        "--steps",
        "3",
        "--grid",
        "2x2",
        "--estimator",
        "exact",
        "--no-plots",
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(server: BackgroundServer, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One unsharded audit (whole/) and SHARDS shard audits sharing one checkpoint folder."""
    root = tmp_path_factory.mktemp("runs")
    assert main(_audit_argv(server.address, data, "--out", str(root / "whole"))) == 0
    for index in range(SHARDS):
        checkpoint = root / "checkpoints" / f"shard-{index}.jsonl"
        checkpoint.parent.mkdir(exist_ok=True)
        argv = _audit_argv(
            server.address, data, "--shards", str(SHARDS), "--checkpoint", str(checkpoint)
        )
        with pytest.MonkeyPatch.context() as env:
            env.setenv("JOB_COMPLETION_INDEX", str(index))  # what an Indexed Job's pod gets
            assert main(argv) == 0
    return root


def test_merged_shards_equal_the_unsharded_audit(runs: Path) -> None:
    shard_sizes = [
        len(json.loads(p.read_text().splitlines()[0])["sample_ids"])
        for p in sorted((runs / "checkpoints").glob("*.jsonl"))
    ]
    assert shard_sizes == [4, 3, 3]
    assert main(["audit-merge", str(runs / "checkpoints"), "--out", str(runs / "merged")]) == 0
    whole = json.loads((runs / "whole" / "report.json").read_text())
    merged = json.loads((runs / "merged" / "report.json").read_text())
    summary_keys = (
        "model",
        "model_content_hash",
        "fingerprint",
        "config",
        "n_players",
        "n_samples",
        "n_failed",
        "clean_accuracy",
        "robust_accuracy",
        "success_rate",
        "profile",
        "per_class",
    )
    for key in summary_keys:
        assert merged[key] == whole[key], key
    assert [s["id"] for s in merged["samples"]] == [str(i) for i in range(10)]
    # Every sample's result too (ids, predictions, profiles, forwards): nothing depends on
    # which shard, stream or replica computed it.
    assert merged["samples"] == whole["samples"]
    # Not a vacuous equality: the audit measured something.
    assert whole["n_samples"] == 10 and 0 < whole["clean_accuracy"] <= 1
    assert any(abs(v) > 0 for v in whole["profile"]["clean_mean_abs"])


def test_merge_refuses_missing_incomplete_and_repeated_shards(runs: Path, tmp_path: Path) -> None:
    shards = sorted((runs / "checkpoints").glob("*.jsonl"))
    with pytest.raises(interscope.CheckpointError, match=r"shards \[1\] of 3 are missing"):
        interscope.merge_audits([shards[0], shards[2]])
    torn = tmp_path / "torn"
    torn.mkdir()
    for path in shards:
        shutil.copy(path, torn / path.name)
    lines = (torn / shards[2].name).read_text().splitlines(keepends=True)
    (torn / shards[2].name).write_text("".join(lines[:-1]))  # its last sample never finished
    with pytest.raises(interscope.CheckpointError, match=r"shard 2 .* has 2 of 3 samples"):
        interscope.merge_audits([torn])
    with pytest.raises(interscope.CheckpointError, match="shard 0 appears twice"):
        interscope.merge_audits([*shards, torn / shards[0].name])


def test_a_restarted_shard_resumes_from_its_checkpoint(
    runs: Path, server: BackgroundServer, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = runs / "resume.jsonl"
    shutil.copy(runs / "checkpoints" / "shard-1.jsonl", checkpoint)
    argv = _audit_argv(server.address, data, "--shards", "3", "--shard-index", "1")
    assert main([*argv, "--checkpoint", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "3 samples" in out and "(3 from the checkpoint)" in out


def test_bad_shards_are_refused_before_anything_is_sent(
    server: BackgroundServer, digits: tuple[np.ndarray, np.ndarray], data: Path
) -> None:
    x, y = digits
    with interscope.Client(server.address) as client:
        for shard in ((3, 3), (-1, 2), (0, 0)):
            with pytest.raises(ValueError, match="shard"):
                client.audit(
                    model="digits-cnn",
                    x=x,
                    y=y,
                    attack={"attack": "fgsm", "eps": 0.1},
                    profile={"grid": (2, 2)},
                    shard=shard,
                )
    # --shards without an index, and no JOB_COMPLETION_INDEX: a clear error, exit code 1.
    with pytest.MonkeyPatch.context() as env:
        env.delenv("JOB_COMPLETION_INDEX", raising=False)
        assert main(_audit_argv(server.address, data, "--shards", "2")) == 1
