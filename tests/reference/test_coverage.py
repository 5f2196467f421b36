"""Every press has its reference transcription module, which cites the code the press names as its source."""

import ast
import re
from pathlib import Path

import pytest

from kvbench.presses import PRESSES, WRAPPERS

HERE = Path(__file__).parent
#: Presses without source code: their modules check the rule kvbench states.
NO_SOURCE = {"full", "random"}


def module_of(name: str) -> Path:
    return HERE / f"test_{re.sub(r'[^0-9a-zA-Z]', '_', name)}.py"


@pytest.mark.parametrize("name", [*PRESSES, *WRAPPERS])
def test_press_has_a_transcription_citing_its_source(name):
    path = module_of(name)
    assert path.is_file(), f"{name}: no reference transcription {path.relative_to(HERE.parent.parent)}"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstring = ast.get_docstring(tree) or ""
    tests = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    assert tests, f"{path.name} has no tests"
    cls = PRESSES.get(name) or WRAPPERS[name]
    if name in NO_SOURCE:
        assert not cls.reference
        return
    assert cls.reference, f"{name}: set the press's `reference` (owner/repo@commit path (function))"
    repository = cls.reference.split()[0]  # owner/repo@commit
    assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{7,40}", repository), cls.reference
    owner_repo, commit = repository.split("@")
    assert owner_repo in docstring and commit in docstring, f"{path.name}'s docstring must cite {repository}"
