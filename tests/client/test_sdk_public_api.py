"""The public surface: a sorted __all__ of real names, and an import that needs no torch."""

from __future__ import annotations

import subprocess
import sys

import interscope


def test_all_is_sorted_and_complete() -> None:
    assert interscope.__all__ == sorted(interscope.__all__)
    for name in interscope.__all__:
        assert hasattr(interscope, name), name
    public = {n for n in dir(interscope) if not n.startswith("_") and n not in {"annotations"}}
    modules = {"codec", "v1", "oip", "cli", "report", "errors"}
    assert public - modules - set(interscope.__all__) == set()


def test_public_classes_live_in_the_package() -> None:
    assert interscope.Client.__module__ == "interscope"
    assert issubclass(interscope.NotFoundError, interscope.InterscopeError)


def test_client_and_cli_import_without_torch_or_the_server() -> None:
    code = (
        "import sys, interscope, interscope.cli, interscope.report\n"
        "bad = [m for m in ('torch', 'interscope_server', 'matplotlib') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
