"""The picture of the code, under test: arrows the architecture forbids fail here, so the structure cannot drift.

cli -> (run, sweep, report, bench) -> (engine, presses, tasks, store); presses are a leaf; tasks and the store know
nothing of torch; the engine knows nothing of datasets; only ``cli/`` talks to the terminal (rich, typer).
Imports inside functions count as much as those at the top.
"""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "kvbench"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every kvbench module and what it imports (absolute names, relative imports resolved)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                    base = ".".join([*anchor, base] if base else anchor)
                found.add(base)
                found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES}
        out[name] = found
    return out


MODULES = {_module_name(p) for p in PACKAGE.rglob("*.py")}


def _within(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


#: (who, what it must not import, why)
RULES = [
    (("kvbench.presses",), lambda m: _within(m, "kvbench") and not _within(m, "kvbench.presses", "kvbench.errors"),
     "a press is a leaf: it imports only other presses and kvbench.errors"),
    (("kvbench.tasks",), lambda m: _within(m, "torch", "transformers"), "datasets and scorers know nothing of torch"),
    (("kvbench.store",), lambda m: _within(m, "torch", "transformers"), "the store knows nothing of torch"),
    (("kvbench.engine",), lambda m: _within(m, "kvbench.tasks", "kvbench.store", "kvbench.run", "kvbench.sweep",
                                            "kvbench.report", "kvbench.cli"),
     "the engine knows nothing of datasets, the store or the commands"),
    (("kvbench.tasks", "kvbench.store", "kvbench.engine", "kvbench.presses"),
     lambda m: _within(m, "kvbench.run", "kvbench.runner", "kvbench.sweep", "kvbench.report", "kvbench.bench",
                       "kvbench.fidelity"),
     "no arrow back from the parts to the jobs"),
    (("kvbench.engine", "kvbench.presses", "kvbench.tasks", "kvbench.store", "kvbench.run", "kvbench.runner",
      "kvbench.sweep", "kvbench.report", "kvbench.bench"),
     lambda m: _within(m, "kvbench.verify", "kvbench.lmeval", "lm_eval"),
     "verify and the lm-eval adapter sit on top: nothing they serve depends on them"),
]


def violations() -> list[str]:
    found = []
    table = imports()
    for module, imported in table.items():
        for owners, forbidden, why in RULES:
            if _within(module, *owners):
                found += [f"{module} imports {m}: {why}" for m in sorted(imported) if forbidden(m)]
        if not _within(module, "kvbench.cli", "kvbench.__main__"):
            found += [f"{module} imports {m}: only kvbench.cli talks to the terminal" for m in sorted(imported)
                      if _within(m, "rich", "typer", "kvbench.cli")]
    return found


def test_no_forbidden_arrow():
    assert violations() == []


def test_the_rules_see_function_level_imports(tmp_path, monkeypatch):
    """The control: an import hidden in a press's function is an arrow too."""
    fake = tmp_path / "kvbench"
    (fake / "presses").mkdir(parents=True)
    (fake / "presses" / "sneaky.py").write_text("def f():\n    from kvbench.engine.cache import BudgetCache\n")
    (fake / "report.py").write_text("from rich.table import Table\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert sorted(v.split(":")[0] for v in violations()) == ["kvbench.presses.sneaky imports kvbench.engine.cache",
                                                             "kvbench.report imports rich.table"]


def _runtime_imports(path: Path) -> set[str]:
    """The kvbench modules ``path`` imports when it runs (``if TYPE_CHECKING:`` blocks are for the type checker)."""
    found: set[str] = set()

    def visit(node) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                found.add(child.module)
                found.update(f"{child.module}.{alias.name}" for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text()))
    return found & MODULES


def test_no_import_cycle():
    """run -> fidelity -> runner, never back: no module reaches itself through what it imports."""
    graph = {_module_name(p): _runtime_imports(p) - {_module_name(p)} for p in PACKAGE.rglob("*.py")}
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            assert module != start, f"{start} imports itself through {sorted(seen)}"
            if module not in seen:
                seen.add(module)
                todo += graph.get(module, ())


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_and_function_sizes(path):
    """No module over 400 lines, no function over 60."""
    text = path.read_text()
    assert len(text.splitlines()) <= 400
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(ast.parse(text))
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.end_lineno - n.lineno + 1 > 60]
    assert long == []


def test_the_view_a_press_is_promised_is_the_view_the_engine_gives():
    """``presses.base.View`` (what a press may read) against ``engine.view.SlotView`` (what the engine passes): every
    attribute of the protocol is a field of the same type, and ``attention`` has the same signature."""
    import inspect
    import typing

    from kvbench.engine.view import SlotView
    from kvbench.presses.base import View

    promised = typing.get_type_hints(View)
    given = typing.get_type_hints(SlotView)
    assert promised, "the View protocol declares no attribute"
    for name, kind in promised.items():
        assert name in given, f"View.{name} is not a SlotView field"
        if kind is not typing.Any:
            assert given[name] == kind, f"View.{name} is {kind}, SlotView.{name} is {given[name]}"
    assert inspect.signature(View.attention) == inspect.signature(SlotView.attention)
