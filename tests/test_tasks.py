"""Datasets: the arith generator, extraction and scoring, and GSM8K from the local copy of the real data."""

import os
from pathlib import Path

import pytest

from kvbench.errors import DataError
from kvbench.tasks import load_examples, load_task
from kvbench.tasks.arith import generate_arith
from kvbench.tasks.extract import extract
from kvbench.tasks.score import numeric

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_arith_is_deterministic_and_exact():
    a, b = generate_arith(20, seed=0), generate_arith(20, seed=0)
    assert a == b and generate_arith(20, seed=1) != a
    assert generate_arith(5) == a[:5]  # a prefix: --num-samples N is the first N, the same for every press
    for item in a:
        assert int(item["answer"]) > 0 and item["question"].endswith("now?")


def test_arith_answers_match_a_replay_of_the_story():
    import re

    for item in generate_arith(200):
        sentences = item["question"].split(". ")
        value = int(re.search(r"has (\d+)", sentences[0]).group(1))
        for s in sentences[1:]:
            if "doubles" in s:
                value *= 2
            elif m := re.search(r"gives (\d+) \w+ to", s):
                value -= int(m.group(1))
            elif m := re.search(r"gives \w+ (\d+) more", s):
                value += int(m.group(1))
        assert value == int(item["answer"]), item


@pytest.mark.parametrize(("text", "expected"), [
    ("So 3 + 4 = 7. The answer is 7.", "7"),
    ("The answer is: $1,250.", "$1,250"),
    ("the answer is **42**", "42"),
    ("<think>The answer is 3</think> Final: The answer is 5", "5"),
    ("First 2, then \\boxed{18}", "18"),
    ("We get 12 apples, then 15 apples", "15"),
    ("no digits here", None),
])
def test_extraction_chain(text, expected):
    assert extract(text, ["answer_is", "boxed", "last_number"]) == expected


@pytest.mark.parametrize(("pred", "gold", "ok"), [
    ("18", "18", True), ("18.00", "18", True), ("$1,000", "1000", True), ("18 apples", "18", True),
    ("-3", "-3", True), ("0.5", "1/2", False), ("17", "18", False), (None, "18", False),
])
def test_numeric_scorer(pred, gold, ok):
    assert numeric(pred, gold) is ok


@pytest.mark.skipif(not (SHARED_DATA / "gsm8k" / "test.jsonl").is_file(), reason="needs ../shared/data")
def test_gsm8k_gold_rationales_score_correct(monkeypatch):
    """Every GSM8K test rationale, read as a model response, extracts and scores correct."""
    monkeypatch.setenv("KVBENCH_DATA_DIR", str(SHARED_DATA))
    task = load_task("gsm8k")
    examples = load_examples(task)
    assert len(examples) == 1319
    import json

    raw = [json.loads(line) for line in (SHARED_DATA / "gsm8k" / "test.jsonl").open()]
    wrong = [ex.id for ex, rec in zip(examples, raw) if not task.score(task.extract(rec["answer"]), ex.gold)]
    assert wrong == []


@pytest.mark.skipif(not (SHARED_DATA / "gsm8k" / "test.jsonl").is_file(), reason="needs ../shared/data")
def test_subset_is_fixed_and_seeded(monkeypatch):
    monkeypatch.setenv("KVBENCH_DATA_DIR", str(SHARED_DATA))
    task = load_task("gsm8k")
    a = [e.id for e in load_examples(task, 10)]
    assert a == [e.id for e in load_examples(task, 10)] and len(set(a)) == 10


def test_wrong_size_and_missing_file_are_clear(tmp_path, monkeypatch):
    task = load_task("gsm8k")
    with pytest.raises(DataError, match="not found"):
        load_examples(task, data_dir_override=str(tmp_path))
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    with pytest.raises(DataError, match="expected 1319"):
        load_examples(task, data_dir_override=str(tmp_path))
    os.environ.pop("KVBENCH_DATA_DIR", None)
