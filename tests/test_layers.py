"""The layers below api/ import nothing above them (docs/architecture.md): read from the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parents[1] / "service" / "interscope_server"
#: What every lower layer may import from the server besides itself.
LEAVES = {
    "interscope_server.cancel",
    "interscope_server.errors",
    "interscope_server.layout",
    "interscope_server.evaluator",
    "interscope_server.openmp",
    "interscope_server.blocking",
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("layer", ["analysis", "attacks", "models"])
def test_lower_layers_import_only_themselves_and_the_leaves(layer: str) -> None:
    files = sorted((SERVER / layer).glob("*.py"))
    assert files
    own = f"interscope_server.{layer}"
    for path in files:
        for name in _imports(path):
            if name.startswith("interscope_server"):
                # `from interscope_server import errors` yields "interscope_server" and the leaf.
                allowed = name == "interscope_server" or name.startswith(own)
                allowed = allowed or any(name.startswith(leaf) for leaf in LEAVES)
                assert allowed, f"{path.name} imports {name}"
            assert not name.startswith("interscope.v1"), f"{path.name} imports {name}"
            if name.split(".")[0] == "grpc":
                assert (layer, path.name) == ("models", "oip_backend.py"), path.name


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from interscope_server.api import specs\nimport grpc\n")
    assert {"interscope_server.api", "interscope_server.api.specs", "grpc"} <= _imports(bad)
