"""Every dataset's hub layout, loaded offline from fixtures that copy each hub repository's layout and schema
(tests/fixtures/hub, see its README) through the same ``datasets`` call the hub path makes."""

import json
from pathlib import Path

import pytest

from kvbench.errors import DataError
from kvbench.tasks import available, load_examples, load_task
from kvbench.tasks.protocols import get_protocol
from tests.conftest import SHARED_DATA, require_shared_data

FIXTURES = Path(__file__).parent / "fixtures" / "hub"
HUB_DATASETS = sorted(name for name in available() if load_task(name).hub)


@pytest.fixture(autouse=True)
def offline_mirror(monkeypatch, tmp_path):
    import datasets

    monkeypatch.setenv("KVBENCH_HUB_MIRROR", str(FIXTURES))
    monkeypatch.delenv("KVBENCH_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")


def hub_examples(name, protocol="kvbench"):
    return load_examples(load_task(name).for_protocol(get_protocol(protocol)), check_size=False)


def local_examples(name, protocol="kvbench"):
    require_shared_data()
    task = load_task(name).for_protocol(get_protocol(protocol))
    return load_examples(task, data_dir_override=str(SHARED_DATA))


def gold_response(task, gold):
    """A response that states ``gold`` the way the task's prompt asks for it."""
    if task.scorer == "drop":
        return f"The answer is {json.loads(gold)[0][0]}."
    if task.scorer == "math":
        return f"So the answer is \\boxed{{{gold}}}."
    return f"The answer is {gold}."


def test_every_hub_dataset_has_a_fixture():
    assert len(HUB_DATASETS) == 11
    for name in HUB_DATASETS:
        assert (FIXTURES / load_task(name).hub["path"]).is_dir(), name


@pytest.mark.parametrize("name", HUB_DATASETS)
def test_hub_layout_loads_and_golds_score(name):
    task = load_task(name)
    examples = hub_examples(name)
    assert examples and all(e.source.startswith(f"mirror:{task.hub['path']}@sha256:") for e in examples)
    for example in examples:
        assert example.gold and task.messages(example)[-1]["content"]
        assert task.score(gold_response(task, example.gold), example.gold).correct, (name, example.id)


@pytest.mark.parametrize("name", HUB_DATASETS)
def test_hub_and_local_layouts_give_the_same_examples(name):
    """The fixture rows are the local copies' first rows: both mappings must give the same prompt and gold."""
    local = local_examples(name)
    task = load_task(name)
    for hub, copy in zip(hub_examples(name), local):
        assert task.user_content(hub)[0] == task.user_content(copy)[0], (name, hub.id)
        assert hub.gold == copy.gold, (name, hub.id)


@pytest.mark.parametrize("name", [n for n in HUB_DATASETS if "hott" in load_task(n).protocols])
def test_hott_hub_layouts_match_local(name):
    task = load_task(name).for_protocol(get_protocol("hott"))
    for hub, copy in zip(hub_examples(name, "hott"), local_examples(name, "hott")):
        assert hub.gold == copy.gold and task.user_content(hub)[0] == task.user_content(copy)[0], (name, hub.id)


def test_strategyqa_parquet_export_has_only_the_default_config():
    """The export holds strategyQA/test/0000.parquet without a card: asking for config "strategyQA" fails."""
    task = load_task("strategyqa")
    assert "name" not in task.hub
    assert len(hub_examples("strategyqa")) == 4
    broken = {**task.hub, "name": "strategyQA"}
    with pytest.raises(DataError, match="strategyQA"):
        load_examples(load_task("strategyqa").__class__(**{**task.__dict__, "hub": broken}), check_size=False)


def test_logiqa_hub_rows_in_file_order_are_keyed_by_label():
    """Rows 108 and 114 list options A, C, B, D on the hub; after option_order they match the local copy."""
    hub, local = hub_examples("logiqa"), local_examples("logiqa")
    for row in (108, 114):
        assert hub[row].fields["choices"] == local[row].fields["choices"]
        assert hub[row].gold == local[row].gold
    # item 114: "Some northerners are not workers" is the only valid answer, and its label is the key
    assert hub[114].fields["choices"]["ABCD".index(hub[114].gold)].startswith("Some northerners are not workers")


def test_hub_size_is_checked():
    with pytest.raises(DataError, match="4 examples, expected 1319"):
        load_examples(load_task("gsm8k"))


def test_revision_is_refused_for_local_files(tmp_path):
    with pytest.raises(DataError, match="--dataset-revision applies to the hub"):
        load_examples(load_task("gsm8k"), data_dir_override=str(FIXTURES), revision="main")
    from tests.test_cli import kvbench

    result = kvbench("run", "-d", "gsm8k", "--dataset-revision", "main", "--data-dir", str(FIXTURES),
                     "--store", str(tmp_path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "applies to the hub" in result.stderr


def test_revision_is_refused_for_the_mirror_which_holds_one_copy():
    # the autouse fixture points KVBENCH_HUB_MIRROR at the fixtures: a revision asked for could not be honoured
    with pytest.raises(DataError, match="--dataset-revision main: KVBENCH_HUB_MIRROR holds one copy"):
        load_examples(load_task("gsm8k"), revision="main", check_size=False)


def annotation(number="", spans=(), date=("", "", "")):
    return {"number": number, "spans": list(spans), "date": dict(zip(("day", "month", "year"), date)),
            "worker_id": "", "hit_id": ""}


def test_drop_one_annotators_answer_scores_exact():
    """Two annotators, two different single-span answers: either is a full answer (EM 1), not half of one."""
    from kvbench.tasks.fields import drop_annotations, drop_spans

    task = load_task("drop")
    answer, other = annotation(spans=["Chaz Schilens"]), annotation(spans=["JaMarcus Russell"])
    as_columns = {key: [other[key]] for key in other}  # how datasets returns the script's Sequence of a dict
    for validated in ([other], as_columns):
        gold = drop_annotations([answer, validated])
        assert json.loads(gold) == [["Chaz Schilens"], ["JaMarcus Russell"]]
        scored = task.score("The answer is Chaz Schilens.", gold)
        assert scored.correct and scored.metrics["f1"] == 1.0
    # ucinlp/drop flattens both annotators into one span list: the same answer is half of a two-span gold
    flattened = task.score("The answer is Chaz Schilens.", drop_spans({"spans": ["Chaz Schilens", "JaMarcus Russell"]}))
    assert not flattened.correct and flattened.metrics["f1"] == 0.5


def test_drop_annotations_numbers_dates_and_repeats():
    from kvbench.tasks.fields import drop_annotations

    gold = drop_annotations([annotation(number="3"), [annotation(number="2"), annotation(number="3"),
                                                       annotation(date=("5", "May", "1990")), annotation()]])
    assert json.loads(gold) == [["3"], ["2"], ["5 May 1990"]]


def test_drop_fixture_row_with_two_annotators():
    task = load_task("drop")
    example = hub_examples("drop")[1]  # "Pakistanis and Filipinos" / "Pakistani and Filipino"
    assert len(json.loads(example.gold)) == 2
    assert task.score("The answer is Pakistani and Filipino.", example.gold).correct


def test_the_hub_commit_read_is_part_of_the_run_key():
    from dataclasses import replace

    from kvbench.runs.plan import RunConfig, build_cells, run_key

    config = RunConfig(dataset="gsm8k", presses=("full",))
    task, cell = load_task("gsm8k"), build_cells(config)[0]
    examples = hub_examples("gsm8k")
    at = [replace(e, source=f"hub:openai/gsm8k@{'a' * 40}") for e in examples]
    moved = [replace(e, source=f"hub:openai/gsm8k@{'b' * 40}") for e in examples]
    assert run_key(config, task, cell, None, at) != run_key(config, task, cell, None, moved)
    assert run_key(config, task, cell, None, at) == run_key(config, task, cell, None, at)
    # local files keep the keys they had before revisions were recorded
    local = [replace(e, source="local:sha256:0123") for e in examples]
    assert run_key(config, task, cell, None, local) == run_key(config, task, cell, None)
