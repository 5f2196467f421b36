"""The picture of the code, under test: the import contracts in ``pyproject.toml`` (import-linter: layers, forbidden
arrows) hold and catch a planted wrong arrow; no import cycle; only ``cli/`` prints; sizes; the press's view.

docs/architecture.md draws the packages and the arrows the contracts allow.
"""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "kvbench"
LINT = Path(sys.executable).parent / "lint-imports"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p) for p in PACKAGE.rglob("*.py")}


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          timeout=300)


def test_the_import_contracts_hold():
    result = lint(PACKAGE.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


#: (module, a line planted in it, the contract that must catch it)
PLANTS = [
    ("tasks/fields.py", "from kvbench.engine.cache import BudgetCache", "Tasks and the store never import"),
    ("store/parts.py", "def f():\n    from kvbench.engine.generate import generate", "Tasks and the store never"),
    ("engine/cache.py", "def f():\n    from kvbench.runs.session import Session", "The engine knows nothing"),
    ("engine/layer.py", "import kvbench.models", "The engine knows nothing"),
    ("engine/decode.py", "def f():\n    import kvbench.bench.workload", "The engine knows nothing"),
    ("presses/knorm.py", "import kvbench.engine.view", "Presses are a leaf"),
    ("results/report.py", "from rich.table import Table", "Only the command line talks"),
    ("runs/plan.py", "import kvbench.results.report", "Layers"),
]


@pytest.mark.parametrize(("module", "line", "contract"), PLANTS, ids=[p[0] for p in PLANTS])
def test_a_planted_wrong_arrow_breaks_a_contract(tmp_path, module, line, contract):
    shutil.copytree(PACKAGE, tmp_path / "kvbench", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PACKAGE.parent / "pyproject.toml", tmp_path)
    target = tmp_path / "kvbench" / module
    target.write_text(target.read_text() + "\n" + line + "\n")
    result = lint(tmp_path)
    assert result.returncode != 0, result.stdout[-2000:]
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, broken[:2000]


def _prints(root: Path) -> list[str]:
    """``print`` calls outside ``cli/`` that write to standard output (a warning to ``sys.stderr`` is allowed)."""
    return [f"{p.relative_to(root)}:{n.lineno}" for p in root.rglob("*.py") if "cli" not in p.parts
            for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"
            and not any(k.arg == "file" and ast.unparse(k.value) == "sys.stderr" for k in n.keywords)]


def test_only_the_command_line_prints(tmp_path):
    """Output goes through ``cli/``: a ``print`` anywhere else is a module talking to the terminal."""
    assert _prints(PACKAGE) == []
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "report.py").write_text("def f(x):\n    print(x)\n")
    assert _prints(tmp_path) == ["results/report.py:2"]


def _imports(path: Path) -> set[str]:
    """The kvbench modules ``path`` imports, anywhere in it (functions and ``if TYPE_CHECKING:`` blocks too: a type
    that needs an import back is a circle as much as a call does)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found & MODULES


def test_no_import_cycle():
    """plan -> runner, never back: no module reaches itself through what it imports."""
    graph = {_module_name(p): _imports(p) - {_module_name(p)} for p in PACKAGE.rglob("*.py")}
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
