"""The shape docs/ARCHITECTURE.md promises: imports run one way, with no cycles, read from the code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lower ranks sit below higher ones; a package imports only packages ranked below it (docs/ARCHITECTURE.md).
RANKS = {
    "errors": 0, "demo": 0,
    "native": 1, "checkpoint": 1,
    "quant": 2,
    "model": 3,
    "offload": 4,
    "loading": 5,
    "evals": 6, "serve": 6, "perf": 6, "quality": 6, "training": 6,
    "cli": 7,
}


def _package_of(path: Path) -> str:
    parts = path.relative_to(ROOT).parts
    return parts[0] if len(parts) > 1 else path.stem


def _sources() -> list[Path]:
    return [p for name in RANKS for p in ([ROOT / f"{name}.py"] if (ROOT / f"{name}.py").exists() else
                                           sorted((ROOT / name).rglob("*.py")))]


def _is_module(dotted: str) -> bool:
    folder = ROOT.joinpath(*dotted.split(".")[1:])
    return folder.with_suffix(".py").exists() or (folder / "__init__.py").exists()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(dsmoe module imported, line, at module level) for every import run when the code runs."""
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue  # annotations only: never imported at run time
            if isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                # ``from dsmoe import load``: the package's face, which is loading.py's (plus __version__)
                if child.module == "dsmoe":
                    names = [f"dsmoe.{a.name if a.name in RANKS else 'loading'}" for a in child.names]
                else:  # ``from dsmoe.quant import kernels`` imports the module dsmoe.quant.kernels
                    names = [f"{child.module}.{a.name}" if _is_module(f"{child.module}.{a.name}") else child.module
                             for a in child.names]
                found.extend((name, child.lineno, top) for name in names if name.startswith("dsmoe."))
            elif isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, top) for a in child.names if a.name.startswith("dsmoe."))
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(ast.parse(path.read_text()), True)
    return found


def _target_package(module: str) -> str:
    return module.split(".")[1]


def test_every_package_has_a_rank() -> None:
    on_disk = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists() and p.name not in ("tests", "benchmarks")}
    assert on_disk <= set(RANKS), f"give {sorted(on_disk - set(RANKS))} a place in RANKS and docs/ARCHITECTURE.md"


def test_imports_point_down() -> None:
    upward = []
    for path in _sources():
        package = _package_of(path)
        for module, line, _ in _imports(path):
            target = _target_package(module)
            if target != package and not RANKS.get(target, 99) < RANKS[package]:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {module} ({package} -> {target})")
    assert not upward, "\n".join(upward)


def test_no_import_inside_a_function_outside_the_cli() -> None:
    """The CLI imports lm-eval and the HTTP stack only for the commands that need them (startup time);
    anywhere else an import inside a function is a cycle being dodged."""
    inside = [f"{path.relative_to(ROOT)}:{line} imports {module}" for path in _sources() if _package_of(path) != "cli"
              for module, line, top in _imports(path) if not top]
    assert not inside, "\n".join(inside)


def test_no_import_cycle_between_modules() -> None:
    graph: dict[str, set[str]] = {}
    for path in _sources():
        name = "dsmoe." + ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = {m for m, _, top in _imports(path) if top}
    state: dict[str, int] = {}

    def walk(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                walk(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])


def test_the_checks_catch_an_upward_import(tmp_path: Path) -> None:
    """The walker sees a function-level upward import (what the rules exist to stop)."""
    source = tmp_path / "x.py"
    source.write_text("from dsmoe.errors import DsmoeError\n\ndef f():\n    from dsmoe.cli import main\n")
    assert _imports(source) == [("dsmoe.errors", 1, True), ("dsmoe.cli.main", 4, False)]
    guarded = tmp_path / "y.py"
    guarded.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dsmoe.cli import main\n")
    assert _imports(guarded) == []
