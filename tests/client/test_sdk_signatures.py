"""Every public SDK verb spells out its parameters: no **kwargs for editors or type checkers to
miss, and the profile/attack verbs take every options field under the field's own name."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import interscope
from interscope import AsyncClient, AttackOptions, Client, ProfileOptions


def _public_callables() -> Iterator[tuple[str, Callable[..., Any]]]:
    for name in interscope.__all__:
        obj = getattr(interscope, name)
        if inspect.isclass(obj):
            for attr, member in inspect.getmembers(obj, callable):
                if not attr.startswith("_") or attr == "__init__":
                    yield f"{name}.{attr}", member
        elif callable(obj):
            yield name, obj


def test_no_public_sdk_callable_takes_var_keyword() -> None:
    checked = 0
    for name, fn in _public_callables():
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):
            continue  # builtins without a signature (e.g. Exception methods)
        if getattr(fn, "__module__", "").split(".")[0] != "interscope":
            continue
        kinds = [p.kind for p in signature.parameters.values()]
        assert inspect.Parameter.VAR_KEYWORD not in kinds, name
        checked += 1
    assert checked > 20  # the walk really reached the clients' verbs


@pytest.mark.parametrize("cls", [Client, AsyncClient])
@pytest.mark.parametrize(
    ("verb", "options"),
    [
        ("profile", ProfileOptions),
        ("profile_stream", ProfileOptions),
        ("attack", AttackOptions),
        ("attack_stream", AttackOptions),
    ],
)
def test_verbs_take_every_options_field_by_name(cls: type, verb: str, options: type) -> None:
    parameters = inspect.signature(getattr(cls, verb)).parameters
    for field in dataclasses.fields(options):
        assert field.name in parameters, f"{cls.__name__}.{verb} lacks {field.name}"
        assert parameters[field.name].kind is inspect.Parameter.KEYWORD_ONLY
    # Blocking and asyncio clients take the same parameters.
    assert list(parameters) == list(inspect.signature(getattr(Client, verb)).parameters)
