"""The package's layers, one direction (docs/architecture.md): every import in the source tree, at module level
or inside a function, is parsed with ``ast`` and checked against the layer table below. A module imports only
its own layer (within its group) or a lower one; a cycle between modules fails even within a layer; the
repository folders are reached only through the ``vila_hd`` namespace (``import train`` is an error)."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Folder -> the package it is installed as (setup.cfg's package_dir).
FOLDERS = {"vila_hd": "vila_hd", "train": "vila_hd.train", "eval": "vila_hd.eval", "llava_compat": "vila_hd.compat",
           "configs": "vila_hd.configs"}

# Layers, lowest first. A module's layer is that of the longest prefix listed; the serve, train and eval groups
# share a rank but do not import each other (the CLI and the demo, above them, bring them together).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("ground", ("vila_hd.errors", "vila_hd.quiet", "vila_hd.hub", "vila_hd.images", "vila_hd.host_syncs",
                "vila_hd.configs", "vila_hd.templates", "vila_hd.dtypes", "vila_hd.scenes", "vila_hd.visualize",
                "vila_hd.arguments")),
    ("ps3", ("vila_hd.ps3",)),
    ("model", ("vila_hd.model",)),
    ("processing", ("vila_hd.processing",)),
    ("compat", ("vila_hd.compat",)),
    ("loading", ("vila_hd.loading", "vila_hd.builder")),
    ("serve", ("vila_hd.engine", "vila_hd.api", "vila_hd.serve", "vila_hd.chat", "vila_hd.infer")),
    ("train", ("vila_hd.train",)),
    ("eval", ("vila_hd.eval",)),
    ("cli", ("vila_hd.cli", "vila_hd.__main__", "vila_hd.demo", "vila_hd.train.cli", "vila_hd.eval.cli",
             "vila_hd.serve.cli", "vila_hd.compat.convert", "vila_hd.eval.lmms_eval_model")),
]
RANKS = {"ground": 0, "ps3": 1, "model": 2, "processing": 3, "compat": 4, "loading": 5,
         "serve": 6, "train": 6, "eval": 6, "cli": 7, "root": 8}  # root: a package __init__ (a facade)


def layer_of(module: str) -> str:
    best, layer = -1, None
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), name
    if layer is None:  # the package roots (vila_hd, vila_hd.train, ...): their __init__ is a facade
        return "root"
    return layer


def source_modules() -> dict[str, pathlib.Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def imports_of(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> list[tuple[int, str]]:
    """(line, imported module of ours) for every import statement of ``path``; bare top-level folder names
    (``train``, ``eval``, ``llava_compat``) are returned as they are, to be refused."""
    found = []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            top = target.split(".")[0]
            if top in ("train", "eval", "llava_compat"):
                found.append((node.lineno, target))
                continue
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.append((node.lineno, target))
    return found


MODULES = source_modules()
EDGES = {name: imports_of(name, path, MODULES) for name, path in MODULES.items()}


def violations(edges: dict[str, list[tuple[int, str]]] = EDGES, paths: dict[str, pathlib.Path] = MODULES) -> list[str]:
    found = []
    for name, imported in sorted(edges.items()):
        mine = layer_of(name)
        for line, target in imported:
            where = f"{paths[name].name if not paths[name].is_relative_to(ROOT) else paths[name].relative_to(ROOT)}:{line}"
            if target.split(".")[0] != "vila_hd":
                found.append(f"{where}: imports {target} outside the vila_hd namespace")
                continue
            theirs = layer_of(target)
            if target == "vila_hd":
                continue  # `from vila_hd import __version__`: the facade's constants
            if RANKS[theirs] > RANKS[mine]:
                found.append(f"{where}: {name} ({mine}) imports {target} ({theirs}), a higher layer")
            elif RANKS[theirs] == RANKS[mine] and theirs != mine:
                found.append(f"{where}: {name} ({mine}) imports {target} ({theirs}), a sibling layer")
    return found


def cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {name: sorted({t for _, t in edges if t in MODULES}) for name, edges in EDGES.items()}
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return out


def test_every_module_has_a_layer():
    assert [name for name in MODULES if layer_of(name) == "root" and MODULES[name].name != "__init__.py"] == []


def test_imports_point_down():
    assert violations() == []


def test_no_import_cycles():
    # A package's __init__ re-exporting its submodules is not a cycle of the code.
    found = [c for c in cycles() if not any(MODULES[m].name == "__init__.py" for m in c)]
    assert found == []


@pytest.mark.parametrize("source, expected", [
    ("from vila_hd.train.config import X", "vila_hd.hub (ground) imports vila_hd.train.config (train), a higher layer"),
    ("from vila_hd.engine import Engine", "vila_hd.hub (ground) imports vila_hd.engine (serve), a higher layer"),
    ("import train.config", "imports train.config outside the vila_hd namespace"),
])
def test_the_check_finds_an_upward_import(tmp_path, source, expected):
    path = tmp_path / "hub.py"
    path.write_text(f"def f():\n    {source}\n")
    found = violations({"vila_hd.hub": imports_of("vila_hd.hub", path, MODULES)}, {"vila_hd.hub": path})
    assert len(found) == 1 and expected in found[0] and found[0].startswith("hub.py:2"), found


def test_the_check_finds_a_sibling_import(tmp_path):
    path = tmp_path / "harness.py"
    path.write_text("from vila_hd.train import config\n")
    found = violations({"vila_hd.eval.harness": imports_of("vila_hd.eval.harness", path, MODULES)},
                       {"vila_hd.eval.harness": path})
    assert found == ["harness.py:1: vila_hd.eval.harness (eval) imports vila_hd.train.config (train), a sibling layer"]
