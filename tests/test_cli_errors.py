"""The CLI fails as a person needs it to: one line naming what went wrong and what to do, a
non-zero exit code, never a traceback (unless --debug); and long work shows its progress."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from interscope.cli import build_parser, main
from interscope_server.config import Settings

#: Hides the server extra's packages from a CLI subprocess: a client-only install.
CLIENT_ONLY = """
import sys
from importlib.abc import MetaPathFinder
BLOCKED = {"torch", "onnxruntime", "onnx", "pydantic", "pydantic_settings", "sklearn"}
class Absent(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Absent())
from interscope.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env() -> dict[str, str]:
    """This process's environment with PYTHONPATH made absolute, so a subprocess in another
    folder imports the same interscope as the tests (a source tree, or the installed one)."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    absolute = os.pathsep.join(str(Path(p).resolve()) for p in paths)
    return {**os.environ, "PYTHONPATH": absolute, "INTERSCOPE_LOG_LEVEL": "WARNING"}


def _cli(
    *argv: str, timeout: float = 120, code: str | None = None
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "interscope.cli"]
    return subprocess.run(
        [*command, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
    )


def _one_line_failure(done: subprocess.CompletedProcess[str], command: str) -> str:
    """The single stderr line of a failed command; asserts its shape and the exit code."""
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"interscope {command}: "), lines[0]
    return lines[0]


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A port some other process holds (a listening socket of this test)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_serve_with_a_missing_repository_says_which_setting(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    line = _one_line_failure(_cli("serve", "--model-repository", str(missing)), "serve")
    assert f"model repository '{missing}' is not a directory" in line
    assert "--model-repository / INTERSCOPE_MODEL_REPOSITORY" in line


def test_serve_on_a_taken_port_names_the_port_and_the_setting(listening_port: int) -> None:
    done = _cli("serve", "--host", "127.0.0.1", "--port", str(listening_port), "--no-metrics")
    line = _one_line_failure(done, "serve")
    assert f"cannot bind the gRPC port 127.0.0.1:{listening_port}" in line
    assert "--port / INTERSCOPE_PORT" in line


def test_a_second_replica_is_told_the_metrics_port_is_taken(listening_port: int) -> None:
    done = _cli(
        "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", str(listening_port)
    )
    line = _one_line_failure(done, "serve")
    assert f"cannot bind the metrics port 0.0.0.0:{listening_port}" in line
    assert "--metrics-port / INTERSCOPE_METRICS_PORT" in line and "--no-metrics" in line


def test_debug_shows_the_traceback_instead(tmp_path: Path) -> None:
    done = _cli("serve", "--model-repository", str(tmp_path / "nonexistent"), "--debug")
    assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr
    assert "is not a directory" in done.stderr


def test_every_setting_has_a_serve_flag_that_sets_it() -> None:
    parser = build_parser()
    serve = next(
        a
        for a in parser._subparsers._group_actions  # type: ignore[union-attr]
        if isinstance(a, argparse._SubParsersAction)
    ).choices["serve"]
    flags = {o for action in serve._actions for o in action.option_strings}
    for field in Settings.model_fields:
        assert f"--{field.replace('_', '-')}" in flags, field
    args = parser.parse_args(["serve", "--max-players", "12", "--half-precision", "--port", "7"])
    assert (args.max_players, args.half_precision, args.port) == ("12", True, "7")


def test_a_bad_serve_value_names_its_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", "70000"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("interscope serve: --port / INTERSCOPE_PORT: ") and "70000" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["serve", "--port", "0"], "serve"),
        (["demo", "--samples", "1"], "demo"),
        (["demo-repository", "somewhere"], "demo-repository"),
    ],
)
def test_server_commands_in_a_client_only_install_say_what_to_install(
    argv: list[str], command: str, tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CLIENT_ONLY, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=_env(),
    )
    line = _one_line_failure(done, command)
    assert 'pip install "interscope[server]"' in line


def test_version() -> None:
    done = _cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == "interscope 0.1.0"


def test_out_of_range_numbers_name_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["attack", "--model", "m", "--data", str(tmp_path / "d.npz"), "--steps", "-5"])
    assert exit_info.value.code == 2
    assert "argument --steps: must be >= 0, got -5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["audit", "--model", "m", "--data", "d.npz", "--eps", "nan"])
    assert "argument --eps: must be a finite number > 0, got nan" in capsys.readouterr().err


def test_data_that_is_not_an_npz_is_refused_saying_what_is_expected(
    address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "data.csv"
    text.write_text("1,2,3\n")
    assert main(["attack", "--address", address, "--model", "digits-cnn", "--data", str(text)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"interscope attack: {text}: not an .npz archive (an .npz with arrays x (inputs) and y "
        "(integer labels), as numpy.savez writes)"
    )
    no_y = tmp_path / "no_y.npz"
    np.savez(no_y, x=np.zeros((2, 1, 16, 16), np.float32))
    assert main(["audit", "--address", address, "--model", "digits-cnn", "--data", str(no_y)]) == 1
    assert "no array y in it" in capsys.readouterr().err


def test_an_audit_whose_samples_all_fail_exits_non_zero_and_groups_the_failures(
    address: str,
    tmp_path: Path,
    demo_test_data: tuple[np.ndarray, np.ndarray],
    capsys: pytest.CaptureFixture[str],
) -> None:
    x, _ = demo_test_data
    data = tmp_path / "bad-labels.npz"
    np.savez(data, x=x[:3], y=np.array([99, 99, 99]))
    argv = ["audit", "--address", address, "--model", "digits-cnn", "--data", str(data)]
    argv += ["--steps", "2", "--grid", "2x2", "--estimator", "exact", "--json"]
    assert main(argv) == 1
    captured = capsys.readouterr()

    def no_nan(token: str) -> None:
        raise AssertionError(f"--json printed {token}")

    report = json.loads(captured.out, parse_constant=no_nan)
    assert report["clean_accuracy"] is None and len(report["samples"]) == 3
    assert "audit of 3 samples: attack pgd linf eps 0.03137, 2 steps" in captured.err
    assert "interscope audit: 3 of 3 samples of digits-cnn failed" in captured.err
    assert "  3 x INVALID_ARGUMENT (samples 0, 1, 2): " in captured.err
    assert "Traceback" not in captured.err


def test_ctrl_c_during_an_audit_says_how_to_resume_and_exits_130(
    address: str, tmp_path: Path, demo_test_data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = demo_test_data
    data = tmp_path / "digits.npz"
    np.savez(data, x=x[:200], y=y[:200])
    out = tmp_path / "out"
    argv = [
        sys.executable, "-m", "interscope.cli", "audit", "--address", address,
        "--model", "digits-cnn", "--data", str(data), "--steps", "30", "--grid", "2x2",
        "--estimator", "exact", "--out", str(out), "--streams-per-address", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    seen = []
    try:
        assert proc.stderr is not None
        # Piped stderr gets a plain line at every tenth: interrupt once one tenth is done.
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("audit digits-cnn: ") and "(0%)" not in line:
                break
        else:
            raise AssertionError("no progress line:\n" + "".join(seen))
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == 130, "".join(seen) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    assert "Traceback" not in rest, rest
    last = rest.strip().splitlines()[-1]
    checkpoint = out / "checkpoint-digits-cnn.jsonl"
    assert last.startswith("interscope audit: interrupted with "), last
    assert last.endswith(f"of 200 samples of digits-cnn done (rerun the same command to resume "
                         f"from {checkpoint})"), last  # fmt: skip
    kept = len(checkpoint.read_text().splitlines()) - 1  # less the header line
    assert kept >= 20
    # The same command again: it says it resumes, and how far the checkpoint got.
    again = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming: {kept} of 200 samples from {checkpoint}" in again.stderr
    assert f"({kept} from the checkpoint)" in again.stdout


def test_feature_groups_take_indices_ranges_and_names() -> None:
    from interscope.cli import CliError, feature_groups

    names = ["age", "income", "height"]
    assert feature_groups("0-2;3,5;income", names) == [[0, 1, 2], [3, 5], [1]]
    assert feature_groups("all", names) == []
    with pytest.raises(CliError, match="ends before it starts"):
        feature_groups("5-2", names)
    with pytest.raises(CliError, match="'weight', which is neither"):
        feature_groups("age;weight", names)
    with pytest.raises(CliError, match="empty group"):
        feature_groups("0;;1", names)
