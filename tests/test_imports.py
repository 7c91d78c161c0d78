"""streamconv's modules import alone, and their imports point down a table of layers, with no cycle.

The graph is read statically (`ast`): every `import` and `from ... import` of a streamconv module, at module level or
inside a function (an import moved into a function to dodge a cycle is still a cycle).
"""

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Top first: a module imports from its own layer or the layers below it, never above. A module belongs to the
# layer of the longest name here that is it or a package above it (the names to come are listed already).
LAYERS = [
    ("cli", {"streamconv.cli", "streamconv.__main__", "streamconv.demo"}),
    ("api", {"streamconv", "streamconv.api", "streamconv.converter"}),
    ("run and verify", {"streamconv.run", "streamconv.parts", "streamconv.ray_parts", "streamconv.verification",
                        "streamconv.verify"}),
    ("planning", {"streamconv.planning"}),
    ("families, sources, engine, formats", {
        "streamconv.families", "streamconv.sources", "streamconv.engine", "streamconv.plan",
        "streamconv.reads", "streamconv.arrange", "streamconv.casts", "streamconv.pipeline", "streamconv.clock",
        "streamconv.formats",
        "streamconv.hf_folder", "streamconv.tokenizer", "streamconv.output",
        "streamconv.options"}),
    ("process", {"streamconv.process"}),
    ("records, errors and version", {"streamconv.recipe", "streamconv.errors", "streamconv._version"}),
]
FAMILIES = {"streamconv.families"}
SOURCES = {"streamconv.sources"}
ENGINE = {"streamconv.engine", "streamconv.plan", "streamconv.reads", "streamconv.arrange", "streamconv.casts",
          "streamconv.pipeline", "streamconv.clock"}
FORMATS = {"streamconv.formats", "streamconv.hf_folder", "streamconv.tokenizer",
           "streamconv.output"}
ABOVE_THE_ENGINE = {name for _, names in LAYERS[:4] for name in names}  # cli, api, run and verify, planning



def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name)."""
    found = {}
    for path in sorted((ROOT / "streamconv").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The streamconv modules `name` imports anywhere in its file; `from p import m` counts as m when m is a
    module, else as p."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                above = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(above + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if (m == "streamconv" or m.startswith("streamconv.")) and m != name}


@functools.cache
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def within(name: str, names: set[str]) -> bool:
    """`name` is one of `names` or inside one of them (a package; but `streamconv` stands for its __init__ alone)."""
    return any(name == n or n != "streamconv" and name.startswith(n + ".") for n in names)


def layer(name: str) -> int:
    """The index in LAYERS of the longest entry that is `name` or a package above it."""
    matches = [(len(n), i) for i, (_, names) in enumerate(LAYERS) for n in names if within(name, {n})]
    assert matches, f"{name} has no layer: add it to LAYERS in {Path(__file__).name}"
    return max(matches)[1]


def reachable(start: str, edges: dict[str, set[str]]) -> dict[str, list[str]]:
    """Every module `start` imports, directly or not, with one chain of imports that gets there."""
    paths = {start: [start]}
    todo = [start]
    while todo:
        here = todo.pop()
        for there in sorted(edges.get(here, ())):
            if there not in paths:
                paths[there] = paths[here] + [there]
                todo.append(there)
    return paths


def test_each_module_imports_alone():
    """Each module imported first, in a clean slate of streamconv modules (third-party ones stay loaded, which keeps
    this to one interpreter): an import that works only after another module was imported fails here."""
    names = sorted(set(modules()) - {"streamconv.__main__"})  # (which runs the command line)
    script = """
import importlib, json, sys, traceback
failed = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "streamconv" or m.startswith("streamconv.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed[name] = traceback.format_exc(limit=-3)
print(json.dumps(failed))
"""
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(names)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    failed = json.loads(proc.stdout.splitlines()[-1])
    assert not failed, "\n".join(f"{name}:\n{trace}" for name, trace in failed.items())


def test_the_import_graph_has_no_cycle():
    edges = graph()
    cycles = set()
    for name in edges:
        for there in edges[name]:
            chain = reachable(there, edges).get(name)  # there -> ... -> name, which imports there
            if chain is not None:
                first = chain.index(min(chain))
                cycles.add(tuple(chain[first:] + chain[:first]))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join([*c, c[0]]) for c in sorted(cycles))


def test_every_module_has_a_layer_and_imports_point_down():
    edges = graph()
    for name in edges:
        layer(name)
    upward = [f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})"
              for a in sorted(edges) for b in sorted(edges[a]) if layer(b) < layer(a)]
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_sources_engine_and_formats_never_reach_a_family():
    """A new family must not touch a source, the engine or a format: none of them imports a family module,
    directly or through another module."""
    edges = graph()
    found = [" -> ".join(chain) for name in sorted(edges) if within(name, SOURCES | ENGINE | FORMATS)
             for there, chain in sorted(reachable(name, edges).items()) if within(there, FAMILIES)]
    assert not found, "imports of a family:\n" + "\n".join(found)


def test_the_engine_never_imports_the_command_line_api_or_run():
    edges = graph()
    found = [" -> ".join(chain) for name in sorted(edges) if within(name, ENGINE)
             for there, chain in sorted(reachable(name, edges).items()) if within(there, ABOVE_THE_ENGINE)]
    assert not found, "the engine reaches the layers above it:\n" + "\n".join(found)


if __name__ == "__main__":  # python -m tests.test_imports: the graph, one line per module group
    edges: dict[str, set[str]] = {}
    for name, targets in graph().items():
        for target in targets:
            here, there = (".".join(m.split(".")[:2]) for m in (name, target))
            if here != there:
                edges.setdefault(here, set()).add(there.removeprefix("streamconv."))
    for here in sorted(edges):
        print(f"{here.removeprefix('streamconv.') or here} -> {', '.join(sorted(edges[here]))}")
