"""Every command the README and docs/ show is run here, at a small size, so that none can break unseen.

Commands are read from the ```bash blocks of README.md and docs/*.md. Each runs in a scratch directory holding a
small store (``results/``, with generation, fidelity and bench rows) and small copies of the grids: a command runs
as written except that it is made small (``small``): the tiny Llama for a model (a shape alias: the tiny Qwen2), one
example, a few new tokens, short benchmark runs, scratch paths, `--compile` traced by the eager backend. The paper's
grids name hub models that cannot load here and hold 672 runs: they run with ``--dry-run`` (the whole grid checked
and planned). A command that reads a hub revision must fail in one clear line offline. What is not run here
(``make``, the kvpress venv of docs/kvpress-peer.md) is listed in ``NOT_RUN`` with the reason, and the test fails
when a listed command leaves the docs.
"""

from __future__ import annotations

import csv
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvbench.cli import app
from kvbench.runs.plan import RunConfig, execute
from tests.conftest import TINY_GATES, TINY_STATISTICS

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DATA = ROOT.parent / "shared" / "data"
#: Commands not run by this test, with why.
NOT_RUN = {
    "make run": "the main job: `tests/test_main_job.py` runs its RUN_ARGS small; CI's `make test` installs as it does",
    "make test": "the suite itself",
    "make run RUN_ARGS=": "the main job with other presses: `run` with the same options runs below",
    "python3 -m venv": "docs/kvpress-peer.md: the venv kvpress 0.5.5 needs (transformers < 5.3)",
    "/tmp/kvpvenv/bin/": "docs/kvpress-peer.md: run in kvpress's own venv",
    "benchmarks.kvpress_peer": "docs/kvpress-peer.md: its halves exchange files with kvpress's venv (40 minutes)",
    "benchmarks.compiled_window": "docs/measurements.md: compiles the embedded model with inductor twice (minutes); "
                                  "each of its ways of decoding is a generation option tested on its own",
    "--text long-text.txt": "docs/measurements.md: calibrates a hub model (its weights, a GPU, a long text of yours)",
}
#: Grids whose models are hub checkpoints: checked and planned (``--dry-run``), not run.
HUB_GRIDS = ("grids/paper.csv", "grids/paper-hott.csv", "grids/methods-2026.csv")


def commands() -> list[str]:
    """Every command line of the docs' bash blocks (continuations joined, comments dropped)."""
    found = []
    for path in DOCS:
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", path.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                if line and not line.startswith("#"):
                    found.append(line)
    return list(dict.fromkeys(found))


def _is_run(command: str) -> bool:
    return not any(part in command for part in NOT_RUN)


COMMANDS = commands()  # read once: every test and the store look-up below use them
RUN = [c for c in COMMANDS if _is_run(c)]


def test_every_command_is_run_or_named_with_a_reason():
    shown = COMMANDS
    assert len(RUN) >= 40  # the README's kvbench commands
    for command in RUN:
        assert command.split()[0] in ("kvbench", "python") or command.startswith("KVBENCH_DATA_DIR="), command
    for part in NOT_RUN:  # a reason for a command that is no longer shown is stale
        assert any(part in c for c in shown), part


SMALL = {"--num-samples": "1", "-n": "1", "--max-new-tokens": "4", "--gen-len": "24", "--prompt-len": "16",
         "--examples": "2", "--memory-gib": "1", "--runs": "2", "--steps": "3"}
MODELS = {"r1-qwen-7b": "tiny-qwen2", "llama-3.1-8b": "tiny-llama"}


def small(command: str, scratch: Path) -> list[str]:
    """``command``'s arguments made small (see the module's doc)."""
    words = shlex.split(command.replace("<commit>", "0" * 40))
    words = [w for w in words if not w.startswith("KVBENCH_DATA_DIR=")]
    out = []
    for i, word in enumerate(words):
        previous = words[i - 1] if i else ""
        if previous in SMALL and word.replace(",", "").isdigit():
            word = SMALL[previous]
        elif previous in ("--model", "-m") and words[1] not in ("report", "lm-eval"):
            word = MODELS.get(word, "tiny-llama")
        elif word.startswith("/tmp/"):  # a scratch path, not the machine's /tmp
            word = str(scratch / word.removeprefix("/tmp/"))
        elif "=/tmp/" in word:  # a press argument naming a scratch file (-a stats=/tmp/...)
            word = word.replace("=/tmp/", f"={scratch}/")
        elif word.startswith("pretrained="):
            word = re.sub(r"pretrained=[^,]+", "pretrained=tiny-llama", word)
        out.append(word)
    if out[:2] in (["kvbench", "run"], ["kvbench", "fidelity"], ["kvbench", "inspect"], ["kvbench", "bench"]):
        if "--model" not in out and "-m" not in out:
            out += ["--model", "tiny-llama"]
        for option, value in (("--num-samples", "1"), ("--max-new-tokens", "4"), ("--gen-len", "24")):
            aliases = {"--num-samples": ("-n",)}.get(option, ())
            applies = {"--gen-len": out[1] == "bench", "--num-samples": out[1] in ("run", "fidelity")}.get(
                option, out[1] != "bench")
            if applies and option not in out and not any(a in out for a in aliases):
                out += [option, value]
    if "--compile" in out and "--compile-backend" not in out:  # traced, not code-generated: seconds, not minutes
        out += ["--compile-backend", "eager"]
    if out[:2] == ["kvbench", "sweep"] and any(grid in out for grid in HUB_GRIDS) and "--dry-run" not in out:
        out.append("--dry-run")
    return out


@pytest.fixture(scope="module")
def seed_store(tmp_path_factory):
    """A small store: generation and fidelity rows of the tiny Llama (full, h2o and snapkv-d at two budgets)."""
    store = tmp_path_factory.mktemp("seed") / "results"
    for kind, measure in (("generate", ("attention-loss",)), ("fidelity", ())):
        execute(RunConfig(model="tiny-llama", presses=("full", "h2o", "snapkv-d"), budgets=(16, 32), num_samples=2,
                          max_new_tokens=6, store=str(store), kind=kind, measure=measure))
    result = CliRunner().invoke(app, ["bench", "--model", "tiny-llama", "-p", "h2o", "-b", "16", "--gen-len", "24",
                                      "--store", str(store)])
    assert result.exit_code == 0, result.output
    return store


def _scratch(tmp_path: Path, seed_store: Path) -> Path:
    """A working directory with the seed store as ``results/`` and small copies of the grids."""
    shutil.copytree(seed_store, tmp_path / "results")
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    (tmp_path / "grids").mkdir()
    for grid in [*(ROOT / "grids").glob("*.csv"), *(ROOT / "examples").glob("*.csv")]:
        rows = list(csv.DictReader(grid.open()))
        if f"grids/{grid.name}" not in HUB_GRIDS:
            for row in rows:
                row.update(model="tiny-llama", num_samples="1", max_new_tokens="4")
        with (tmp_path / grid.parent.name / grid.name).open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        for row in rows:  # a hub model's statistics and gates come from elsewhere: stand-ins for the dry run
            for name, path in re.findall(r"(stats|gates)=([^;\s]+)", row.get("press_args") or ""):
                (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(TINY_STATISTICS if name == "stats" else TINY_GATES, tmp_path / path)
    return tmp_path


@pytest.mark.parametrize("command", RUN)
def test_readme_command_runs(command, tmp_path, seed_store, monkeypatch):
    scratch = _scratch(tmp_path, seed_store)
    monkeypatch.chdir(scratch)
    if DATA.is_dir():
        monkeypatch.setenv("KVBENCH_DATA_DIR", str(DATA))
    argv = small(command, scratch)
    for needed in [*_stores_written_before(argv, scratch), *_files_written_before(argv, scratch)]:
        made = CliRunner().invoke(app, small(needed, scratch)[1:])
        assert made.exit_code == 0, (needed, made.output[-2000:], made.exception)
    if "--revision" in argv:  # a hub revision, offline: one clear line, exit 2, before anything loads
        _offline_hub_error(argv, scratch)
        return
    if argv[0] == "python":
        import subprocess
        import sys

        result = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=600,
                                cwd=scratch, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert result.returncode == 0, result.stderr[-2000:]
        return
    if argv[1] == "lm-eval":
        argv = _local_lm_eval(argv, scratch)
    result = CliRunner().invoke(app, argv[1:])
    assert result.exit_code == 0, (argv, result.output[-3000:], result.exception)


def _stores_written_before(argv: list[str], scratch: Path) -> list[str]:
    """The docs' commands that write a store ``argv`` reads and the scratch directory lacks (``results/...``)."""
    missing = [w.rstrip("/") for w in argv[2:] if w.startswith("results/") and not (scratch / w).exists()]
    writers = []
    for path in missing:
        writer = next((c for c in COMMANDS if f"--store {path}" in c and _is_run(c) and c != " ".join(argv)),
                      None)
        if writer is not None and "--store" not in argv:
            writers.append(writer)
    return writers


def _files_written_before(argv: list[str], scratch: Path) -> list[str]:
    """The docs' commands that write (``--out /tmp/...``) a scratch file ``argv`` reads and the scratch lacks."""
    read = [m for w in argv for m in re.findall(rf"={re.escape(str(scratch))}/(\S+)", w)]
    return [next(c for c in COMMANDS if f"--out /tmp/{name}" in c) for name in read if not (scratch / name).exists()]


def _offline_hub_error(argv: list[str], scratch: Path) -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "KVBENCH_DATA_DIR"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "kvbench", *argv[1:]], capture_output=True, text=True,
                            timeout=300, cwd=scratch, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def _local_lm_eval(argv: list[str], scratch: Path) -> list[str]:
    """lm-eval's gsm8k reads the hub: the same command on a local generative task of one example."""
    from tests.test_lmeval import TASK

    data = scratch / "arith.jsonl"
    data.write_text('{"question": "What is 2 plus 3?", "answer": "5"}\n')
    (scratch / "tasks").mkdir()
    (scratch / "tasks" / "tiny_arith.yaml").write_text(TASK.format(data=data))
    argv = [w if w != "gsm8k" else "kvbench_tiny_arith" for w in argv]
    argv = [w for w in argv if w != "--log_samples"] if "--output_path" not in argv and "-o" not in argv else argv
    return [*argv, "--include_path", str(scratch / "tasks"), "--limit", "1", "--device", "cpu"]
