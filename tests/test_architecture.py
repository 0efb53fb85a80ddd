"""The architecture contract: imports go only downward (import-linter's layers contract in pyproject.toml), no
import cycle exists at any level (module- or function-level imports alike), and the CLI starts without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("kvtool")


@pytest.mark.slow
def test_layers_contract_is_kept():
    r = subprocess.run([str(Path(sys.executable).with_name("lint-imports"))], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "1 kept, 0 broken" in r.stdout


def find_cycles(graph) -> list[list[str]]:
    """Tarjan's strongly connected components (of more than one module) over every import grimp finds."""
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for m in modules:
        if m not in index:
            visit(m)
    return cycles


def test_no_import_cycles(graph):
    """No cycle at any level: grimp sees function-level imports too."""
    assert find_cycles(graph) == []
    # the detector does see one when there is one
    probe = grimp.build_graph("kvtool")
    probe.add_import(importer="kvtool.errors", imported="kvtool.cli")
    assert any({"kvtool.cli", "kvtool.errors"} <= set(c) for c in find_cycles(probe))
    # the package's own lazy API (kvtool/__init__) names everything; nothing imports it back
    importers = graph.find_modules_that_directly_import("kvtool") - {"kvtool"}
    assert importers == set(), f"modules import the kvtool package root: {sorted(importers)}"


@pytest.mark.slow
def test_cli_help_imports_neither_torch_nor_transformers():
    code = ("import sys; from kvtool.cli import app; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
