"""The house has layers and every import points down (docs/development.md, "Layout"): this test is the guard.

Every module of ``dat_ds`` is parsed (imports inside functions count too: a lazy import is still a
dependency) and each import is checked against the layer table below. Peers in one layer may import
each other, but the packages must not form a cycle. The benchmark harnesses (``benchmarks/``, beside the
package and outside the wheel) sit above all of it: they may import anything of ``dat_ds``, and ``dat_ds``
imports them nowhere but in the CLI's lazy ``bench`` dispatch.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "dat_ds"
BENCHMARKS = ROOT / "benchmarks"

# unit -> layer; a unit may import units of a lower or equal layer (no cycles among equals).
LAYERS = {
    "__init__": 0, "core": 0,
    "attacks": 1, "optim": 1, "comm": 1, "data": 1, "models": 1,
    "objectives": 2,
    "runtime": 3,
    "evaluation": 4,
    "tune": 5,
    "launch": 6,
    "cli": 7, "train": 7, "evaluate": 7,
}
# The one module of dat_ds that may import ``benchmarks`` (lazily, when a benchmark is chosen).
BENCHMARKS_DISPATCH = "dat_ds/cli/bench.py"


def _module_name(path: Path) -> tuple[str, bool]:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    return ".".join(parts), is_pkg


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "dat_ds":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _is_module(dotted: str) -> bool:
    p = PKG.parent / Path(*dotted.split("."))
    return p.is_dir() or p.with_suffix(".py").is_file()


def imports_of(source: str, name: str, is_pkg: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module) for every dat_ds import in module ``name``'s source, lazy ones included."""
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "dat_ds"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "dat_ds":
                continue
            if module == "dat_ds" or (node.level and not node.module):  # from . import x: x may be a module
                out += [(node.lineno, f"{module}.{a.name}" if _is_module(f"{module}.{a.name}") else module)
                        for a in node.names]
            else:
                out.append((node.lineno, module))
    return out


def all_edges() -> list[tuple[str, int, str, str]]:
    """(file, line, from unit, to unit) for every import between two different units."""
    edges = []
    for path in sorted(PKG.rglob("*.py")):
        src_unit = _unit(_module_name(path)[0])
        for line, module in imports_of(path.read_text(), *_module_name(path)):
            dst_unit = _unit(module)
            if dst_unit is not None and dst_unit != src_unit:
                edges.append((str(path.relative_to(PKG.parent)), line, src_unit, dst_unit))
    return edges


def test_every_unit_has_a_layer():
    units = {_unit(_module_name(p)[0]) for p in PKG.rglob("*.py")}
    assert units <= set(LAYERS), f"add these packages to LAYERS: {sorted(units - set(LAYERS))}"


def test_imports_point_down():
    upward = [f"{f}:{line}: {a} (layer {LAYERS[a]}) imports {b} (layer {LAYERS[b]})"
              for f, line, a, b in all_edges() if LAYERS.get(b, 99) > LAYERS.get(a, -1)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_cycles_between_units():
    graph: dict[str, set[str]] = {}
    for _, _, a, b in all_edges():
        graph.setdefault(a, set()).add(b)
    seen, stack, cycles = set(), [], []

    def visit(node):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        stack.pop()

    for node in sorted(graph):
        visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("src,expected", [
    ("from ..core import dist\n", [(1, "dat_ds.core")]),
    ("def f():\n    from ..evaluation.monitor import X\n", [(2, "dat_ds.evaluation.monitor")]),
    ("from .. import evaluation, __version__\n", [(1, "dat_ds.evaluation"), (1, "dat_ds")]),
    ("import dat_ds.cli\nimport os\n", [(1, "dat_ds.cli")]),
])
def test_the_parser_sees_relative_and_lazy_imports(src, expected):
    """The guard itself: relative imports, imports inside functions and absolute ones are all found."""
    assert imports_of(src, "dat_ds.runtime.probe") == expected


def _absolute_imports(source: str) -> list[tuple[int, str]]:
    """(line, top-level name) of every absolute import, lazy ones included."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def test_the_package_imports_benchmarks_only_in_the_bench_dispatch():
    """``benchmarks/`` is not in the wheel: a ``dat_ds`` module that imported it would break an installed ``dat-ds``."""
    found = [f"{path.relative_to(ROOT).as_posix()}:{line}" for path in sorted(PKG.rglob("*.py"))
             for line, top in _absolute_imports(path.read_text()) if top == "benchmarks"]
    assert found and all(f.startswith(BENCHMARKS_DISPATCH + ":") for f in found), \
        f"only {BENCHMARKS_DISPATCH} may import benchmarks (lazily): {found}"
    dispatch = ast.parse((ROOT / BENCHMARKS_DISPATCH).read_text())
    top_level = [n for n in dispatch.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [n for n in top_level if "benchmarks" in ast.unparse(n)], "the bench dispatch imports benchmarks lazily"


def test_benchmarks_sit_beside_the_package_and_import_it_absolutely():
    """Harnesses live in ``benchmarks/`` (a package of its own), none in ``dat_ds``; they reach the package by
    its name (``from dat_ds...``), never by a relative import that would climb out of ``benchmarks``."""
    assert (BENCHMARKS / "__init__.py").is_file()
    assert not (PKG / "bench").exists(), "benchmark harnesses live in benchmarks/, outside the wheel"
    climbing = [f"{path.relative_to(ROOT).as_posix()}:{node.lineno}" for path in sorted(BENCHMARKS.rglob("*.py"))
                for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.ImportFrom) and node.level > 1]
    assert not climbing, climbing
