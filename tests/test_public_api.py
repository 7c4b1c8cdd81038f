"""The public API is one list: engine/__init__.py's lazy table, from which __all__ is made, and the
stub engine/__init__.pyi that type checkers read must name the same names from the same modules, and
each name must resolve to the object its module defines."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import engine

STUB = Path(engine.__file__).with_suffix(".pyi")


def stub_names(text: str) -> tuple[dict[str, str], list[str]]:
    """(name -> module, the stub's __all__) of a stub made of `from .mod import X as X` lines."""
    tree = ast.parse(text)
    imported = {
        alias.asname or alias.name: node.module or ""
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.level == 1
        for alias in node.names
    }
    declared: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            declared = list(ast.literal_eval(node.value))
    return imported, declared


def test_the_stub_names_what_the_package_resolves() -> None:
    imported, declared = stub_names(STUB.read_text())
    assert sorted(declared) == sorted(engine.__all__)
    assert imported == {**engine._LAZY, "__version__": "version"}  # same names, same modules


def test_every_public_name_resolves_to_its_modules_object() -> None:
    for name, module in engine._LAZY.items():
        assert getattr(engine, name) is getattr(importlib.import_module(f"engine.{module}"), name)


def test_the_reader_sees_a_stub_that_drifted() -> None:
    drifted = "from .runtime import load as load\nfrom .request import EditRequest as EditRequest\n"
    drifted += '__all__ = ["load", "EditRequest"]\n'
    imported, declared = stub_names(drifted)
    assert imported == {"load": "runtime", "EditRequest": "request"} and declared == ["load", "EditRequest"]
    assert imported != {**engine._LAZY, "__version__": "version"}
