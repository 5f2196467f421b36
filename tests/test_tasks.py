"""Datasets: configs, loading from the local copies of the real data, extraction and scoring."""

import json

import pytest

from kvbench.errors import ConfigError, DataError
from kvbench.tasks import LETTERS, available, load_examples, load_task
from kvbench.tasks.arith import generate_arith
from kvbench.tasks.drop import drop_metrics
from kvbench.tasks.extract import extract
from tests.conftest import SHARED_DATA, require_shared_data

EXPECTED = {  # dataset -> (local file, examples)
    "gsm8k": ("gsm8k/test.jsonl", 1319), "math500": ("math500/test.jsonl", 500), "aime24": ("aime24/test.jsonl", 30),
    "aime25": ("aime25/test.jsonl", 30), "commonsense_qa": ("csqa/dev.jsonl", 1221),
    "openbookqa": ("obqa/test.jsonl", 500), "strategyqa": ("strategyqa/dev.jsonl", 2290),
    "reclor": ("reclor/val.jsonl", 500), "drop": ("drop/dev.jsonl", 9536), "folio": ("folio/validation.jsonl", 204),
    "logiqa": ("logiqa/test.jsonl", 651),
}


def local(name):
    require_shared_data(EXPECTED[name][0])
    return load_task(name), load_examples(load_task(name), data_dir_override=str(SHARED_DATA))


def raw_records(name):
    return [json.loads(line) for line in (SHARED_DATA / EXPECTED[name][0]).open()]


def test_every_paper_dataset_has_a_config():
    assert set(EXPECTED) | {"arith"} == set(available())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_locally_with_expected_size(name):
    task, examples = local(name)
    assert len(examples) == EXPECTED[name][1]
    assert len({e.id for e in examples}) == len(examples)
    for example in examples[:50]:
        assert example.gold and task.messages(example)[-1]["content"]


# --- gold self-consistency on the real files -------------------------------------------------------------


def test_gsm8k_gold_rationales_score_correct():
    task, examples = local("gsm8k")
    wrong = [e.id for e, r in zip(examples, raw_records("gsm8k")) if not task.score(r["answer"], e.gold).correct]
    assert wrong == []


def test_math500_gold_solutions_verify():
    task, examples = local("math500")
    results = [task.score(r["solution"], e.gold) for e, r in zip(examples, raw_records("math500"))]
    assert [e.id for e, s in zip(examples, results) if not s.correct] == []
    assert all(s.metrics["strict_match"] for s in results)
    # and the scorer discriminates: each solution against the *next* problem's gold mostly fails
    shifted = sum(task.score(r["solution"], examples[(i + 1) % 500].gold).correct
                  for i, r in enumerate(raw_records("math500")))
    assert shifted < 10


@pytest.mark.parametrize("name", ["aime24", "aime25"])
def test_aime_integer_answers(name):
    task, examples = local(name)
    for e in examples:
        assert task.score(f"so \\boxed{{{int(e.gold):03d}}}", e.gold).correct  # "025" = 25
        assert not task.score(f"\\boxed{{{int(e.gold) + 1}}}", e.gold).correct


def choice_forms(letter):
    number = LETTERS.index(letter) + 1
    return [f"Let me think. The answer is {letter}.", f"Answer: ({letter})", f"So the answer is \\boxed{{{letter}}}",
            f"Thus **{letter}**", f"Therefore the answer is **{letter}. some option text**", f"The answer is {number}.",
            f"I pick option {letter}.", f"Reasoning...\n{letter}"]


@pytest.mark.parametrize("name", ["commonsense_qa", "openbookqa", "reclor", "logiqa"])
def test_multiple_choice_gold_in_every_form_scores_correct(name):
    task, examples = local(name)
    for e in examples:
        other = LETTERS[(LETTERS.index(e.gold) + 1) % len(e.fields["choices"])]
        assert all(task.score(form, e.gold).correct for form in choice_forms(e.gold)), e.id
        assert not any(task.score(form, e.gold).correct for form in choice_forms(other)), e.id


def test_strategyqa_yes_no_forms():
    task, examples = local("strategyqa")
    for e in examples:
        other = "no" if e.gold == "yes" else "yes"
        boolean = "true" if e.gold == "yes" else "false"
        for form in (f"The answer is {e.gold}.", f"Answer: **{e.gold.capitalize()}**", f"\\boxed{{{e.gold}}}",
                     f"The answer is {boolean}."):
            assert task.score(form, e.gold).correct, (e.id, form)
        assert not task.score(f"The answer is {other}.", e.gold).correct


def test_folio_label_forms():
    task, examples = local("folio")
    labels = ["True", "False", "Uncertain"]
    for e in examples:
        forms = [f"The answer is {e.gold}.", f"**{e.gold}**", f"\\boxed{{{e.gold}}}"]
        if e.gold == "Uncertain":
            forms.append("The answer is unknown.")
        assert all(task.score(f, e.gold).correct for f in forms), e.id
        other = labels[(labels.index(e.gold) + 1) % 3]
        assert not task.score(f"The answer is {other}.", e.gold).correct


def test_drop_every_gold_alternative_scores_exact():
    task, examples = local("drop")
    for e in examples:
        for alternative in json.loads(e.gold):
            scored = task.score(f"The answer is {alternative[0]}.", e.gold)
            assert scored.correct and scored.metrics["f1"] == 1.0, (e.id, alternative)


# --- tricky responses ---------------------------------------------------------------------------------------

TRICKY = [
    # (dataset, response, gold, correct, extracted)
    ("gsm8k", "The answer is **1,250**.", "1250", True, "1,250"),
    ("gsm8k", "I think 5. Wait, no: the answer is 7.", "7", True, "7"),
    ("gsm8k", "The answer is $18.00.", "18", True, "$18.00"),
    ("gsm8k", "<think>The answer is 3</think>So the answer is 5.", "5", True, "5"),
    ("gsm8k", "<think>The answer is 3, I am still thinking", "3", False, None),  # answer only inside <think>
    ("gsm8k", "", "3", False, None),
    ("math500", "Thus $\\boxed{\\dfrac{1}{2}}$.", "\\frac{1}{2}", True, "\\dfrac{1}{2}"),
    ("math500", "First \\boxed{3}, then correcting: \\boxed{4}", "4", True, "4"),
    ("commonsense_qa", "The answer is (B) library.", "B", True, "B"),
    ("commonsense_qa", "A good guess is A. But the answer is C.", "C", True, "C"),
    ("commonsense_qa", "A revolving door is convenient.", "A", False, None),  # the article "A" is not an answer
    ("commonsense_qa", "<think>The answer is A</think>", "A", False, None),
    ("strategyqa", "Yes, because... The answer is no.", "no", True, "no"),
    ("strategyqa", "The answer is: **Yes**.", "yes", True, "yes"),
    ("folio", "The conclusion is therefore **Uncertain**.", "Uncertain", True, "Uncertain"),
    ("drop", "Counting the touchdowns, the answer is 3.", json.dumps([["3"]]), True, "3"),
]


@pytest.mark.parametrize(("name", "response", "gold", "correct", "extracted"), TRICKY)
def test_tricky_responses(name, response, gold, correct, extracted):
    scored = load_task(name).score(response, gold)
    assert (scored.correct, scored.extracted) == (correct, extracted)


@pytest.mark.parametrize(("text", "expected"), [
    ("So 3 + 4 = 7. The answer is 7.", "7"), ("First 2, then \\boxed{18}", "18"),
    ("We get 12 apples, then 15 apples", "15"), ("no digits here", None),
])
def test_number_extraction_chain(text, expected):
    assert extract(text, ["answer_is", "boxed", "last_number"]) == expected


# --- DROP official metric on hand-worked examples ------------------------------------------------------------

@pytest.mark.parametrize(("prediction", "golds", "em", "f1"), [
    ("2", [["2.0"]], 1.0, 1.0),  # numbers are canonicalised
    ("the Bears", [["Bears"]], 1.0, 1.0),  # articles and case dropped
    ("12 yards", [["13 yards"]], 0.0, 0.0),  # numbers must match, or F1 is 0
    ("New Orleans Saints", [["Saints"]], 0.0, 0.5),  # bag of tokens: P = 1/3, R = 1
    ("October 5, 1998", [["5 October 1998"]], 0.0, 1.0),  # dates reordered: same bag (F1 1), not EM
    ("October 5, 1998", [["October 5 1998"]], 1.0, 1.0),  # punctuation dropped: EM
    ("Pakistanis", [["Pakistanis and Filipinos"], ["Pakistani and Filipino"]], 0.0, 0.5),  # max over golds
    (["Alice", "Bob"], [["Bob", "Alice"]], 1.0, 1.0),  # multi-span: order-free
    ("Alice", [["Alice", "Bob"]], 0.0, 0.5),  # one of two spans: aligned F1 (1 + 0) / 2
])
def test_drop_metric(prediction, golds, em, f1):
    assert drop_metrics(prediction, golds) == (em, f1)


# --- arith ----------------------------------------------------------------------------------------------------

def test_arith_is_deterministic_and_replays():
    import re

    items = generate_arith(200, seed=0)
    assert items == generate_arith(200, seed=0) and generate_arith(5) == items[:5]
    for item in items:
        sentences = item["question"].split(". ")
        value = int(re.search(r"has (\d+)", sentences[0]).group(1))
        for s in sentences[1:]:
            if "doubles" in s:
                value *= 2
            elif m := re.search(r"gives (\d+) \w+ to", s):
                value -= int(m.group(1))
            elif m := re.search(r"gives \w+ (\d+) more", s):
                value += int(m.group(1))
        assert value == int(item["answer"]) > 0


# --- errors --------------------------------------------------------------------------------------------------

def test_subset_is_fixed_and_seeded():
    task, _ = local("gsm8k")
    a = [e.id for e in load_examples(task, 10, data_dir_override=str(SHARED_DATA))]
    assert a == [e.id for e in load_examples(task, 10, data_dir_override=str(SHARED_DATA))] and len(set(a)) == 10


def test_wrong_size_and_missing_file_are_clear(tmp_path):
    task = load_task("gsm8k")
    with pytest.raises(DataError, match="not found"):
        load_examples(task, data_dir_override=str(tmp_path))
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    with pytest.raises(DataError, match="expected 1319"):
        load_examples(task, data_dir_override=str(tmp_path))
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{oops\n')
    with pytest.raises(DataError, match=r"test.jsonl:2: malformed JSON"):
        load_examples(task, data_dir_override=str(tmp_path))


def test_gated_dataset_names_the_fix(monkeypatch):
    import datasets

    def gated(*args, **kwargs):
        raise ConnectionError("401 Client Error: this dataset is gated, you must be authenticated")

    monkeypatch.delenv("KVBENCH_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset_builder", gated)
    with pytest.raises(DataError, match="gated: accept its terms .* HF_TOKEN"):
        load_examples(load_task("folio"))


BASE = "name: x\nversion: 1\nextractors: [boxed]\nscorer: numeric\n"


@pytest.mark.parametrize(("text", "message"), [
    ("name: x\nversion: [", "malformed YAML"),
    ("name: x\nversion: 1\n", "missing keys"),
    ("name: x\nversion: 1\nprompt: p\nextractors: [nope]\nscorer: numeric\nlocal: {fields: {}}\n",
     "unknown extractor 'nope'"),
    ("name: x\nversion: 1\nprompt: p\nextractors: [boxed]\nscorer: numeric\nlocal: {}\ncolour: red\n",
     "unknown keys colour"),
    ("name: x\nversion: 1\nprompt: p\nextractors: [boxed]\nscorer: numeric\n"
     "hub: {path: a/b, option_order: {field: options, order: [0, 0], rows: [1]}}\n", "option_order needs"),
    (BASE + "prompt: p\nbuiltin: {generator: nope}\n", "unknown generator 'nope'"),
    (BASE + "prompt: p\nlocal: {size: many}\n", "local size must be a positive integer"),
    ("name: x\nversion: one\nextractors: [boxed]\nscorer: numeric\nprompt: p\nlocal: {dir: x}\n",
     "version must be a positive integer"),
    ("name: y\nversion: 1\nextractors: [boxed]\nscorer: numeric\nprompt: p\nlocal: {dir: x}\n",
     "name 'y' is not the file's name 'x'"),
    (BASE + "prompt: 'Q: {question'\nlocal: {fields: {question: q, gold: a}}\n", "write a literal brace"),
    (BASE + "prompt: 'Q: {passage}'\nlocal: {fields: {question: q, gold: a}}\n",
     "uses passage, which the local layout lacks"),
])
def test_malformed_configs_fail_clearly(tmp_path, monkeypatch, text, message):
    (tmp_path / "x.yaml").write_text(text)
    monkeypatch.setenv("KVBENCH_DATASETS_CFG", str(tmp_path))
    with pytest.raises(ConfigError, match=message):
        load_task("x")


def test_dataset_names_are_config_names_not_paths():
    for name in ("../datasets_cfg/gsm8k", "/etc/passwd", "gsm8k/../gsm8k"):
        with pytest.raises(DataError, match="unknown dataset"):
            load_task(name)


def test_repeated_example_ids_are_refused(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    line = '{"question": "q", "answer": "#### 1"}\n'
    (tmp_path / "gsm8k" / "test.jsonl").write_text(line * 1319)
    task = load_task("gsm8k")
    assert len(load_examples(task, data_dir_override=str(tmp_path))) == 1319  # ids from positions: unique
    from dataclasses import replace

    with_ids = replace(task, local={**task.local, "fields": {**task.local["fields"], "id": "question"}})
    with pytest.raises(DataError, match="example id 'q' appears 1319 times"):
        load_examples(with_ids, data_dir_override=str(tmp_path))
