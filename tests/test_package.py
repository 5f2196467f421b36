"""The package as a user installs it: a wheel, installed without -e, run from outside the checkout."""

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_carries_its_data_and_runs_outside_the_checkout(tmp_path):
    pytest.importorskip("setuptools")
    source, dist = tmp_path / "src", tmp_path / "dist"  # a copy: an in-tree build/ could carry stale files
    anywhere = shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__")

    def ignore(folder, names):  # the result store and the tests at the top only (kvbench/results/ is code)
        top = {"results", "tests"} if folder == str(REPO) else set()
        return set(anywhere(folder, names)) | (top & set(names))

    shutil.copytree(REPO, source, ignore=ignore)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(dist)], check=True, cwd=tmp_path, capture_output=True)
    wheel = next(dist.glob("kvbench-*.whl"))
    env = tmp_path / "env"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True)
    # the dependencies come from this interpreter's site-packages, after the wheel's own kvbench
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KVBENCH_") and k != "PYTHONPATH"}

    def kvbench(*args):
        return subprocess.run([str(env / "bin" / "kvbench"), *args], cwd=tmp_path, env=clean, capture_output=True,
                              text=True, timeout=600)

    where = subprocess.run([str(python), "-c", "import kvbench; print(kvbench.__file__)"], cwd=tmp_path, env=clean,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(site), where  # the installed wheel, not the checkout
    listing = kvbench("datasets", "list")
    assert listing.returncode == 0, listing.stderr
    assert all(name in listing.stdout for name in ("arith", "gsm8k", "drop", "strategyqa"))
    assert kvbench("models").returncode == 0
    run = kvbench("run", "--model", "tiny-llama", "-d", "arith", "-n", "1", "--max-new-tokens", "2",
                  "--store", str(tmp_path / "store"))
    assert run.returncode == 0, run.stderr
    assert "tiny-llama on arith" in run.stdout


def test_every_subpackage_is_declared_for_the_wheel():
    """pyproject lists the packages by hand (datasets_cfg/ is mapped into the package from the top of the
    repository): a new sub-package missing from the list would be missing from the wheel."""
    import tomllib

    declared = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "kvbench").rglob("__init__.py")}
    assert found | {"kvbench.datasets_cfg"} == declared
