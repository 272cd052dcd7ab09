"""The `interscope` CLI, in process against a real server, plus `serve` as a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from interscope.cli import main


@pytest.fixture(scope="module")
def data(
    tmp_path_factory: pytest.TempPathFactory, demo_test_data: tuple[np.ndarray, np.ndarray]
) -> Path:
    x, y = demo_test_data
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    np.savez(path, x=x[:6], y=y[:6])
    return path


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> object:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_models_commands(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    listed = _json(capsys, ["models", "list", "--address", address, "--json"])
    assert isinstance(listed, list) and "digits-cnn" in [m["name"] for m in listed]
    got = _json(capsys, ["models", "get", "digits-cnn", "--address", address, "--json"])
    assert isinstance(got, dict) and got["gradients_available"] is True
    assert main(["models", "load", "digits-cnn-adv", "--address", address]) == 0
    assert "loaded digits-cnn-adv" in capsys.readouterr().out
    assert main(["models", "unload", "digits-cnn-adv", "--address", address]) == 0
    assert main(["models", "get", "nope", "--address", address]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_health(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", "--address", address]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert main(["health", "--address", address, "--service", "digits-cnn"]) == 0
    assert main(["health", "--address", "127.0.0.1:1", "--timeout", "2"]) == 1


def test_profile_json(
    address: str,
    tmp_path: Path,
    demo_test_data: tuple[np.ndarray, np.ndarray],
    capsys: pytest.CaptureFixture[str],
) -> None:
    x, y = demo_test_data
    np.save(tmp_path / "x.npy", x[0])
    out = _json(
        capsys,
        [
            "profile",
            "--address",
            address,
            "--model",
            "digits-cnn",
            "--input",
            str(tmp_path / "x.npy"),
            "--label",
            str(int(y[0])),
            "--grid",
            "3x3",
            "--baseline",
            "zero",
            "--value",
            "log-prob",
            "--estimator",
            "exact",
            "--return-pairs",
            "--json",
        ],
    )
    assert isinstance(out, dict)
    assert out["n_players"] == 9 and out["orders"] == list(range(8))
    assert len(out["mean"]) == len(out["mean_abs"]) == 8
    assert len(out["pairs"]) == 36 and all(i < j for i, j in out["pairs"])
    assert np.asarray(out["interactions"]).shape == (8, 36)


def test_attack_json(address: str, data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _json(
        capsys,
        [
            "attack",
            "--address",
            address,
            "--model",
            "digits-cnn",
            "--data",
            str(data),
            "--attack",
            "pgd",
            "--norm",
            "linf",
            "--eps",
            "0.1",
            "--steps",
            "3",
            "--step-size",
            "0.05",
            "--json",
        ],
    )
    assert isinstance(out, dict)
    assert {"clean_accuracy", "robust_accuracy", "success_rate"} <= set(out)
    assert 0 <= out["robust_accuracy"] <= out["clean_accuracy"] <= 1


def test_attack_autoattack_json(
    address: str, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["attack", "--address", address, "--model", "digits-cnn", "--data", str(data)]
    budget = ["--eps", "0.2", "--steps", "2", "--query-budget", "10", "--json"]
    out = _json(capsys, [*argv, "--attack", "autoattack", *budget])
    assert isinstance(out, dict)
    assert 0 <= out["robust_accuracy"] <= out["clean_accuracy"] <= 1
    dlr = _json(capsys, [*argv, "--attack", "apgd", "--loss", "dlr", "--eps", "0.2", "--json"])
    assert isinstance(dlr, dict) and dlr["robust_accuracy"] <= dlr["clean_accuracy"]


def test_audit_writes_report(
    address: str, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "audit"
    argv = [
        "audit",
        "--address",
        f"{address},{address}",
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
        "--out",
        str(out_dir),
    ]
    assert main(argv) == 0
    report = json.loads((out_dir / "report.json").read_text())
    assert report["n_samples"] == 6 and len(report["samples"]) == 6
    assert len({s["id"] for s in report["samples"]}) == 6
    assert {"clean_accuracy", "robust_accuracy"} <= set(report)
    profile = report["profile"]
    for key in ("orders", "clean_mean_abs", "adversarial_mean_abs", "delta_mean"):
        assert len(profile[key]) == 3, key
    for name in ("report.html", "interactions_by_order.png", "delta_by_order.png"):
        assert (out_dir / name).stat().st_size > 0
    # Run again: every sample comes from the default checkpoint in OUT.
    assert main(argv) == 0
    assert "6 from the checkpoint" in capsys.readouterr().out
    combined = tmp_path / "combined"
    assert main(["report", str(out_dir), str(out_dir / "report.json"), "--out", str(combined)]) == 0
    assert (combined / "report.html").is_file()


def test_demo_repository_and_reduced_demo(
    demo_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo-repository", str(demo_repository)]) == 0  # up to date: returns at once
    out_dir = tmp_path / "report"
    assert (
        main(
            [
                "demo",
                "--workdir",
                str(tmp_path),
                "--repository",
                str(demo_repository),
                "--out",
                str(out_dir),
                "--samples",
                "3",
                "--contexts-per-order",
                "2",
                "--steps",
                "2",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "digits-cnn-adv" in printed and "robust acc" in printed
    for model in ("digits-cnn", "digits-cnn-adv"):
        report = json.loads((out_dir / model / "report.json").read_text())
        assert report["n_samples"] == 3
    assert "data:image/png;base64," in (out_dir / "report.html").read_text()


def test_serve_runs_until_sigterm(demo_repository: Path) -> None:
    env = {**os.environ, "INTERSCOPE_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "interscope.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-metrics",
            "--model-repository",
            str(demo_repository),
            "--load-models",
            "digits-cnn",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("interscope listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        assert main(["health", "--address", f"127.0.0.1:{port}", "--timeout", "10"]) == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_audit_from_an_image_folder_with_a_gallery(
    address: str,
    tmp_path: Path,
    demo_test_data: tuple[np.ndarray, np.ndarray],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from PIL import Image

    x, y = demo_test_data
    folder = tmp_path / "digits"
    for k in range(4):
        (folder / str(int(y[k]))).mkdir(parents=True, exist_ok=True)
        pixels = np.round(x[k, 0] * 255).astype(np.uint8)
        Image.fromarray(pixels, "L").save(folder / str(int(y[k])) / f"{k}.png")
    out_dir = tmp_path / "audit"
    argv = [
        "audit",
        "--address",
        address,
        "--model",
        "digits-cnn",
        "--data",
        str(folder),
        "--eps",
        "0.1",
        "--steps",
        "3",
        "--grid",
        "2x2",
        "--estimator",
        "exact",
        "--out",
        str(out_dir),
    ]
    assert main(argv) == 0
    report = json.loads((out_dir / "report.json").read_text())
    assert report["n_samples"] == 4
    assert sorted(s["label"] for s in report["samples"]) == sorted(int(v) for v in y[:4])
    gallery = report["gallery"]
    assert [e["why"] for e in gallery["entries"]] == ["most affected", "least affected"]
    # Chosen among the samples classified right before the attack (the attack's work).
    changes = [s["utility_change"] for s in report["samples"] if s["clean_correct"]]
    assert gallery["entries"][0]["utility_change"] == pytest.approx(max(changes))
    assert gallery["entries"][1]["utility_change"] == pytest.approx(min(changes))
    for entry in gallery["entries"]:
        # Exact 2x2 profile: four Shapley values summing to v(N) - v(0) (efficiency).
        assert len(entry["shapley_clean"]) == 4 and abs(entry["efficiency_gap_clean"]) < 1e-6
        assert np.isfinite(entry["clean_margin"]) and np.isfinite(entry["adversarial_margin"])
        assert (entry["clean_margin"] > 0) == (entry["clean_prediction"] == entry["label"])
    assert report["settings"]["attack"] == "PGD" and report["findings"]["sentences"]
    page = (out_dir / "report.html").read_text()
    assert "Sample gallery: digits-cnn" in page and page.count("<img alt='Sample ") == 2
    assert main([*argv[:6], str(tmp_path / "nothing.csv"), *argv[7:]]) == 1
    assert "nothing.csv: no such file or folder" in capsys.readouterr().err


def test_a_gallery_over_too_many_players_says_why_it_has_no_heatmaps(
    address: str, data: Path, tmp_path: Path
) -> None:
    out_dir = tmp_path / "audit"
    argv = ["audit", "--address", address, "--model", "digits-cnn", "--data", str(data)]
    argv += ["--limit", "2", "--steps", "1", "--grid", "5x4", "--contexts-per-order", "2"]
    argv += ["--ratios", "0.1,0.9", "--out", str(out_dir)]
    assert main(argv) == 0
    gallery = json.loads((out_dir / "report.json").read_text())["gallery"]
    assert "2^20 forwards per input" in gallery["note"] and gallery["entries"]
    assert all("shapley_clean" not in e for e in gallery["entries"])
    assert "2^20 forwards per input" in (out_dir / "report.html").read_text()
