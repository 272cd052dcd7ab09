"""The API layer's shape (docs/architecture.md), read from the source: wire messages are built
in convert.py only, every servicer RPC method is a few lines, and api/ has no import cycle."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from interscope_server.api.analysis_servicer import AnalysisServicer
from interscope_server.api.model_servicer import ModelServicer

SERVER = Path(__file__).resolve().parents[3] / "service" / "interscope_server"
API = SERVER / "api"
#: Where a `*_pb2.<Message>(` call is allowed: the converter, and the OIP backend, a client of
#: a remote inference server that builds that server's requests (not this service's messages).
ALLOWED_BUILDERS = {API / "convert.py", SERVER / "models" / "oip_backend.py"}
RPC_MAX_LINES = 15


def _pb2_aliases(tree: ast.Module) -> set[str]:
    """Local names bound to generated message modules (`analysis_pb2`, `... as pb`)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom | ast.Import):
            for alias in node.names:
                if alias.name.endswith("_pb2"):
                    names.add(alias.asname or alias.name.split(".")[-1])
    return names


def message_constructions(source: str) -> list[str]:
    """`module.Message(` calls on a generated `_pb2` module in `source`, as 'line: text'."""
    tree = ast.parse(source)
    modules = _pb2_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id in modules
            and node.func.attr[:1].isupper()
        ):
            found.append(f"{node.lineno}: {node.func.value.id}.{node.func.attr}")
    return found


def _server_sources() -> list[Path]:
    return [
        p
        for p in sorted(SERVER.rglob("*.py"))
        if not p.name.endswith(("_pb2.py", "_pb2_grpc.py")) and "/v1/" not in p.as_posix()
    ]


def test_wire_messages_are_built_only_in_convert() -> None:
    offenders = {
        str(path.relative_to(SERVER)): found
        for path in _server_sources()
        if path not in ALLOWED_BUILDERS and (found := message_constructions(path.read_text()))
    }
    assert offenders == {}
    assert message_constructions((API / "convert.py").read_text())  # the check sees them


def test_the_constructor_check_sees_aliases_and_ignores_enums() -> None:
    source = (
        "from interscope.v1 import analysis_pb2\n"
        "from x.y import grpc_predict_v2_pb2 as pb\n"
        "a = analysis_pb2.Progress(done=1)\n"
        "b = pb.ModelInferRequest()\n"
        "c = analysis_pb2.AttackKind.Value('ATTACK_KIND_FGSM')\n"
        "d = analysis_pb2.NORM_L2\n"
    )
    assert message_constructions(source) == ["3: analysis_pb2.Progress", "4: pb.ModelInferRequest"]


def _rpc_methods() -> list[tuple[str, object]]:
    methods = []
    for servicer in (AnalysisServicer, ModelServicer):
        for base in servicer.__mro__[1:]:
            if base.__name__.endswith("Servicer") and base.__module__.endswith("_pb2_grpc"):
                for name in vars(base):
                    if name[:1].isupper():
                        methods.append((f"{servicer.__name__}.{name}", getattr(servicer, name)))
    return methods


def test_every_servicer_rpc_method_is_short() -> None:
    methods = _rpc_methods()
    names = {name for name, _ in methods}
    assert {"AnalysisServicer.Profile", "AnalysisServicer.Audit", "ModelServicer.LoadModel"} <= (
        names
    )
    lengths = {name: len(inspect.getsource(method).splitlines()) for name, method in methods}
    assert all(1 < n <= RPC_MAX_LINES for n in lengths.values()), lengths


def _api_imports() -> dict[str, set[str]]:
    """api module -> the api modules it imports (at any depth in the file, lazy ones too)."""
    graph: dict[str, set[str]] = {}
    modules = {p.stem for p in API.glob("*.py")}
    for path in API.glob("*.py"):
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "interscope_server.api":
                    edges.update(a.name for a in node.names if a.name in modules)
                elif node.module.startswith("interscope_server.api."):
                    edges.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("interscope_server.api."):
                        edges.add(alias.name.split(".")[2])
        graph[path.stem] = edges - {path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_api_has_no_import_cycle() -> None:
    graph = _api_imports()
    assert "convert" in graph["profile_flow"] and "call" in graph["audit_flow"]
    assert find_cycle(graph) is None


@pytest.mark.parametrize(
    ("graph", "cycle"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
    ],
)
def test_the_cycle_check_finds_cycles(graph: dict[str, set[str]], cycle: list[str] | None) -> None:
    assert find_cycle(graph) == cycle
