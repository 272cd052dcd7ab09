"""Regenerate the committed Python stubs from proto/ (or, with --check, fail if they are stale)."""

from __future__ import annotations

import argparse
import filecmp
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
# interscope's own API, and the Open Inference Protocol v2 the `oip` backend calls.
PACKAGE_DIRS = (Path("interscope") / "v1", Path("interscope") / "oip" / "v2")
OUT_ROOT = ROOT / "client"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_root: Path) -> list[Path]:
    """Run protoc (grpcio-tools) with the mypy-protobuf plugins into out_root; return the files."""
    protos = sorted(p for package in PACKAGE_DIRS for p in (PROTO_ROOT / package).glob("*.proto"))
    for package in PACKAGE_DIRS:
        (out_root / package).mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    # protoc finds its plugins (protoc-gen-mypy, protoc-gen-mypy_grpc) on PATH; they are console
    # scripts installed beside this interpreter, whether or not its venv is activated.
    scripts = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": os.pathsep.join([scripts, os.environ.get("PATH", "")])}
    subprocess.run(command, check=True, cwd=PROTO_ROOT, env=env)
    return sorted(
        p
        for package in PACKAGE_DIRS
        for p in (out_root / package).iterdir()
        if p.name.endswith(GENERATED_SUFFIXES)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    args = parser.parse_args()
    if not args.check:
        for package in PACKAGE_DIRS:
            for old in (OUT_ROOT / package).iterdir():
                if old.name.endswith(GENERATED_SUFFIXES):
                    old.unlink()
        for path in generate(OUT_ROOT):
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.relative_to(tmp): p for p in generate(Path(tmp))}
        committed = {
            p.relative_to(OUT_ROOT)
            for package in PACKAGE_DIRS
            for p in (OUT_ROOT / package).iterdir()
            if p.name.endswith(GENERATED_SUFFIXES)
        }
        stale = sorted(
            str(name)
            for name in fresh.keys() | committed
            if name not in fresh
            or name not in committed
            or not filecmp.cmp(fresh[name], OUT_ROOT / name, shallow=False)
        )
        if stale:
            print("stale generated stubs (run: python scripts/gen_protos.py):", *stale, sep="\n  ")
            return 1
    print(f"generated stubs are up to date ({len(fresh)} files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
