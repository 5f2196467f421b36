"""kvbench inside lm-evaluation-harness: `--model kvbench` generates what `kvbench run` generates for the same
model, press, budget and prompts, runs through lm-eval's own command line end to end, and refuses log-likelihood
scoring under a budget."""

import json

import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from kvbench.errors import ConfigError  # noqa: E402
from kvbench.integrations.lmeval import KvbenchLM  # noqa: E402
from kvbench.runs.plan import RunConfig, execute  # noqa: E402
from tests.test_cli import kvbench  # noqa: E402

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
TASK = """task: kvbench_tiny_arith
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 20
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def local_task(tmp_path):
    """A small generative task in a local YAML over a local JSON-lines file: nothing to download."""
    rows = [{"question": f"What is {a} plus {b}?", "answer": str(a + b)} for a, b in [(2, 3), (10, 7), (4, 4)]]
    data = tmp_path / "arith.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_arith.yaml").write_text(TASK.format(data=data))
    return tmp_path / "tasks"


def test_generations_equal_kvbench_runs_for_the_same_model_press_budget_and_prompts(tmp_path):
    config = RunConfig(model="tiny-llama", presses=("snapkv-d",), budgets=(16,), num_samples=3, max_new_tokens=24,
                       batch_size=2, press_args=("window_size=4",), store=str(tmp_path / "store"))
    _, (cell,) = execute(config)
    lm = KvbenchLM(pretrained="tiny-llama", press="snapkv-d", budget=16, press_args="window_size:4", batch_size=2,
                   device="cpu")
    requests = [Instance("generate_until", {}, (row["prompt"], {"until": [], "max_gen_toks": 24, "do_sample": False}),
                         i, metadata=("runs", i, 1)) for i, row in enumerate(cell.rows)]
    responses = lm.generate_until(requests)
    assert responses == [row["response"] for row in cell.rows]
    assert any(row["evicted_tokens"] > 0 for row in cell.rows)
    for request, row in zip(requests, cell.rows):  # the telemetry lm-eval logs per sample is kvbench's
        telemetry = request.args[-1]["kvbench"]
        assert (telemetry["output_tokens"], telemetry["evicted_tokens"], telemetry["peak_kv_bytes"]) == (
            row["output_tokens"], row["evicted_tokens"], row["peak_kv_bytes"])


def test_log_likelihood_is_refused_under_a_budget_and_runs_without_one():
    request = Instance("loglikelihood", {}, ("Question: 2 + 2 =", " 4"), 0, metadata=("mc_task", 0, 1))
    with pytest.raises(ConfigError, match="mc_task score continuations by log-likelihood"):
        KvbenchLM(pretrained="tiny-llama", press="h2o", budget=8, device="cpu").loglikelihood([request])
    full = KvbenchLM(pretrained="tiny-llama", device="cpu")
    (logprob, _), = full.loglikelihood([request])
    assert logprob < 0


def test_lm_eval_command_line_runs_kvbench_end_to_end(local_task, tmp_path):
    out = tmp_path / "out"
    result = kvbench("lm-eval", "--model", "kvbench", "--model_args",
                     "pretrained=tiny-llama,press=snapkv-d,budget=16,press_args=window_size:4", "--device", "cpu",
                     "--tasks", "kvbench_tiny_arith", "--include_path", str(local_task), "--batch_size", "2",
                     "--log_samples", "--output_path", str(out), env=OFFLINE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kvbench_tiny_arith" in result.stdout and "exact_match" in result.stdout
    samples = [json.loads(line) for path in out.rglob("samples_*.jsonl") for line in path.read_text().splitlines()]
    assert len(samples) == 3
    telemetry = [s["arguments"]["gen_args_0"]["arg_2"]["kvbench"] for s in samples]
    assert {t["press"] for t in telemetry} == {"snapkv-d"} and sum(t["evicted_tokens"] for t in telemetry) > 0
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert results["config"]["kvbench_press"] == "snapkv-d"  # the model's identity is in the results


def test_a_bad_press_in_model_args_is_one_line_before_the_model_loads(local_task):
    result = kvbench("lm-eval", "--model", "kvbench", "--model_args", "pretrained=tiny-llama,press=nosuch,budget=8",
                     "--device", "cpu", "--tasks", "kvbench_tiny_arith", "--include_path", str(local_task),
                     env=OFFLINE)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown press 'nosuch'")


MC_TASK = """task: kvbench_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: ["1", "2"]
doc_to_target: 0
"""


@pytest.mark.parametrize(("model_args", "tasks", "phrase"), [
    ("pretrained=tiny-llama,press=h2o,budget=eight", "kvbench_tiny_arith", "budget='eight' in --model_args is not"),
    ("pretrained=tiny-llama,press=h2o,budget=8", "no_such_task_x", "--tasks 'no_such_task_x': lm-eval knows no"),
    ("pretrained=tiny-llama,press=h2o,budget=8", "kvbench_tiny_mc", "task kvbench_tiny_mc is multiple_choice"),
    ("pretrained=tiny-llama,press=h2o", "kvbench_tiny_arith", "give budget=N"),
])
def test_lm_eval_refuses_bad_input_in_one_line_before_the_model_loads(local_task, model_args, tasks, phrase):
    (local_task / "tiny_mc.yaml").write_text(MC_TASK.format(data=local_task.parent / "arith.jsonl"))
    result = kvbench("lm-eval", "--model", "kvbench", "--model_args", model_args, "--tasks", tasks,
                     "--include_path", str(local_task), env=OFFLINE)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], result.stderr[-2000:]


def test_lm_eval_picks_the_device_as_run_does_and_keeps_its_info_lines_off_stderr(local_task):
    result = kvbench("lm-eval", "--model", "kvbench", "--model_args", "pretrained=tiny-llama,press=full",
                     "--tasks", "kvbench_tiny_arith", "--include_path", str(local_task), "--limit", "1", env=OFFLINE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert " INFO " not in result.stderr and "CUDA is not available" not in result.stderr


def test_budget_full_in_model_args_is_the_full_cache_as_run_takes_it(local_task):
    """``budget=full`` (as ``run -b full``) is the full cache: no traceback, the model built without a budget;
    with an evicting press it is the one-line refusal that asks for a budget."""
    from kvbench.integrations.lmeval import KvbenchLM, parse_budget, prepared_arguments

    assert [parse_budget(text) for text in ("full", "FULL", "none", "", None, "12")] == [None] * 5 + [12]
    args = ["--model", "kvbench", "--model_args", "pretrained=tiny-llama,budget=full", "--tasks", "kvbench_tiny_arith",
            "--include_path", str(local_task)]
    assert prepared_arguments(args)[-2:] == ["--device", "auto"]
    assert KvbenchLM(pretrained="tiny-llama", budget="full", device="cpu").budget is None
    with pytest.raises(ConfigError, match="give budget=N"):
        prepared_arguments([*args[:3], "pretrained=tiny-llama,press=h2o,budget=full", *args[4:]])
