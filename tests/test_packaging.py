"""pyproject.toml declares what streamconv imports, and nothing it does not.

Read from the source with `ast`, so an import the test environment happens to satisfy (transformers pulls in
huggingface_hub, megatron-core pulls in numpy) still has to be declared, and an extra's package is only
optional when streamconv imports it inside a function.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "streamconv"
# import name -> distribution name, where the two differ
DISTRIBUTIONS = {"yaml": "pyyaml"}
# the extras streamconv itself imports from; the others (test, bench) serve the tests and the benchmarks
RUNTIME_EXTRAS = ("tokenizer", "ray")


def distribution(requirement: str) -> str:
    """The normalised distribution name of a requirement such as `huggingface_hub>=0.24` (PEP 503)."""
    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group()
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> tuple[set[str], set[str]]:
    """(dependencies, the runtime extras' requirements) of pyproject.toml, as distribution names."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    extras = project["optional-dependencies"]
    return ({distribution(r) for r in project["dependencies"]},
            {distribution(r) for extra in RUNTIME_EXTRAS for r in extras[extra]})


class _Imports(ast.NodeVisitor):
    """Third-party top-level modules a file imports, each with whether it does so outside any function."""

    def __init__(self) -> None:
        self.found: dict[str, bool] = {}
        self._depth = 0

    def _function(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _add(self, module: str) -> None:
        top = module.split(".")[0]
        if top != "streamconv" and top not in sys.stdlib_module_names:
            self.found[top] = self.found.get(top, False) or self._depth == 0

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0:
            self._add(node.module)


def imports() -> dict[str, dict[str, bool]]:
    """Distribution name -> {file in streamconv/: imported at module level}."""
    found: dict[str, dict[str, bool]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        visitor = _Imports()
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        for module, eager in visitor.found.items():
            found.setdefault(distribution(DISTRIBUTIONS.get(module, module)), {})[str(path.relative_to(ROOT))] = eager
    return found


def test_every_third_party_import_is_declared():
    dependencies, optional = declared()
    undeclared = {name: sorted(files) for name, files in imports().items() if name not in dependencies | optional}
    assert not undeclared, f"imported by streamconv but not in pyproject.toml's dependencies: {undeclared}"


def test_every_declared_dependency_is_imported():
    dependencies, optional = declared()
    unused = (dependencies | optional) - set(imports())
    assert not unused, f"declared in pyproject.toml but never imported by streamconv: {sorted(unused)}"


def test_an_extra_is_imported_only_when_used():
    """A module-level import of an extra's package would fail `import streamconv` on an install without it."""
    dependencies, optional = declared()
    eager = sorted(f"{name} in {file}" for name, files in imports().items() if name in optional - dependencies
                   for file, module_level in files.items() if module_level)
    assert not eager, f"an optional dependency imported at module level: {eager}"


def test_the_installed_package_imports_nothing_from_the_repository():
    """The tests' and benchmarks' helpers are not installed: `pip install .` ships streamconv/ alone."""
    leaked = {name: sorted(files) for name, files in imports().items() if name in ("tests", "benchmarks")}
    assert not leaked, f"streamconv imports the repository's own helpers, which are not installed: {leaked}"
