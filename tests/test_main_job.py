"""`make run`'s job: the presses ranked by the full cache's behaviour they keep, from the Makefile's own options."""

import re
import shlex
from pathlib import Path

from tests.test_cli import kvbench

MAKEFILE = Path(__file__).parents[1] / "Makefile"


def main_job_args(dataset: str) -> list[str]:
    """``RUN_ARGS`` as the Makefile sets it, with the dataset it would choose."""
    text = MAKEFILE.read_text().replace("\\\n", " ")
    line = re.search(r"^RUN_ARGS \?= (.*)$", text, re.M).group(1)
    return shlex.split(line.replace("$(RUN_DATASET)", dataset))


def _option(args: list[str], name: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == name]


def test_the_main_job_ranks_presses_on_fidelity(tmp_path, monkeypatch):
    args = main_job_args("arith")
    assert _option(args, "--measure") == ["fidelity", "attention-loss"]
    assert _option(args, "--press")[0] == "full" and len(_option(args, "--press")) >= 3
    # The Makefile's job on a tiny model (the embedded one takes minutes): every option but the model and size
    small = list(args)
    small[small.index("--model") + 1] = "tiny-llama"
    small[small.index("--num-samples") + 1] = "3"
    small[small.index("--max-new-tokens") + 1] = "24"
    small[small.index("--budget") + 1] = "16"
    store = tmp_path / "store"
    first = kvbench("run", *small, "--store", str(store), env={"COLUMNS": "200"})
    assert first.returncode == 0, first.stderr
    out = first.stdout
    for column in ("top-1", "KL", "attn loss", "accuracy", "out tok", "tok/s", "KV MiB"):
        assert column in out
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in out.splitlines() if line.count("│") >= 10}
    assert set(rows) == set(_option(args, "--press"))
    budget, n, top1, kl, loss, accuracy = rows["full"][:6]
    assert (budget, n, top1, kl, loss) == ("full", "3", "100.0%", "0.000", "0.0%")
    for press, cells in rows.items():
        for value in (cells[2], cells[4], cells[5]):  # mean ± standard error over the 3 examples
            mean, error = (float(part.strip().rstrip("%")) for part in (value.split("±") + ["0"])[:2])
            assert 0.0 <= mean <= 100.0 and error >= 0.0, (press, value)
        assert float(cells[3].split("±")[0]) >= 0.0 and float(cells[6]) > 0 and float(cells[8]) > 0
    assert "At budget 16, the presses against each other on the same 3 examples (paired, 95% intervals):" in out
    assert re.search(r"  top-1: \S+ (is best|[0-9.]+% and \S+ [0-9.]+% are not distinguishable at n = 3)", out)
    # A second run prints the same table from the store, without loading the model
    from typer.testing import CliRunner

    from kvbench.cli import app
    from kvbench.runs import plan as run_module

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded although every row is stored")

    monkeypatch.setattr(run_module, "load_session", no_load)
    second = CliRunner().invoke(app, ["run", *small, "--store", str(store)], env={"COLUMNS": "200"})
    assert second.exit_code == 0, second.output
    assert out.strip() in second.stdout


def test_a_press_is_bold_only_where_its_reading_names_it_best(tmp_path):
    from kvbench.cli.tables import ranking_table
    from kvbench.runs.plan import RunConfig, execute

    config = RunConfig(model="tiny-llama", presses=("full", "h2o", "streaming_llm"), budgets=(12, 20),
                       num_samples=3, max_new_tokens=16, store=str(tmp_path / "s"), measure=("fidelity",))
    task, cells = execute(config)
    table, lines = ranking_table(task, cells, config)
    bold = [cells[i] for i, row in enumerate(table.rows) if row.style == "bold"]
    headings = [line for line in lines if line.startswith("At budget")]
    assert [h.split(",")[0] for h in headings] == ["At budget 12", "At budget 20"]
    for budget, heading in zip((12, 20), headings):
        top1 = lines[lines.index(heading) + 1]
        rivals = [c for c in cells if c.budget == budget and c.press.evicts]
        means = {c.press.name: sum(r["fidelity_top1"] for r in c.rows) / len(c.rows) for c in rivals}
        leader = max(means, key=means.get)
        assert top1.startswith(f"  top-1: {leader} ")
        named = top1.startswith(f"  top-1: {leader} is best")
        assert named == any(c.budget == budget and c.press.name == leader for c in bold), (top1, bold)
        assert named or "are not distinguishable at n = 3" in top1
    assert all(c.press.evicts for c in bold)
