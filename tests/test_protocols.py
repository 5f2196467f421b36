"""Protocols: the paper's harness's prompts, golds, subset draw, extractors, scorers and stopping rule, against
golden files written from reading its ``reason/`` code; reasoning-model outputs scored from the stored prompt."""

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizers.processors import TemplateProcessing

from kvbench.engine.loops import RepetitionStop
from kvbench.errors import ConfigError
from kvbench.models import byte_tokenizer, default_system_prompt
from kvbench.runs.plan import RunConfig, plan
from kvbench.runs.session import Codec
from kvbench.tasks import load_examples, load_task, subset_indices
from kvbench.tasks.extract import opens_thinking
from kvbench.tasks.hott import hott_default, hott_drop_chars, hott_exact, hott_exact_ci, hott_folio, hott_strategyqa
from kvbench.tasks.protocols import HOTT, KVBENCH, PROTOCOLS, get_protocol
from tests.conftest import SHARED_DATA, require_shared_data

GOLDEN = Path(__file__).parent / "golden" / "hott"
HOTT_DATASETS = sorted(p.name.removesuffix(".prompt.txt") for p in GOLDEN.glob("*.prompt.txt"))
PAPER_DATASETS = ["commonsense_qa", "drop", "folio", "gsm8k", "math500", "openbookqa", "reclor", "strategyqa"]


def hott_examples(name, num_samples=None):
    require_shared_data()
    task = load_task(name).for_protocol(HOTT)
    return task, load_examples(task, num_samples, str(SHARED_DATA), HOTT.subset_seed, HOTT.subset)


def test_every_paper_dataset_has_a_golden_hott_prompt():
    assert set(PAPER_DATASETS) <= set(HOTT_DATASETS)


@pytest.mark.parametrize("name", HOTT_DATASETS)
def test_hott_prompt_and_gold_are_the_forks(name):
    task, examples = hott_examples(name)
    first = next(e for e in examples if e.id in {f"{name}-0", examples[0].id})
    assert task.user_content(first)[0] == (GOLDEN / f"{name}.prompt.txt").read_text()
    assert first.gold == (GOLDEN / f"{name}.gold.txt").read_text()


@pytest.mark.parametrize("name", HOTT_DATASETS)
def test_hott_subset_is_datasets_shuffle_seed_42(name):
    import datasets

    _, everything = hott_examples(name)
    _, drawn = hott_examples(name, 100)
    reference = datasets.Dataset.from_dict({"id": [e.id for e in everything]}).shuffle(seed=42).select(range(100))
    assert [e.id for e in drawn] == reference["id"]


def test_subset_draws():
    assert subset_indices(10, None, "hf-shuffle", 42) == list(range(10))  # the fork shuffles only for a subset
    assert subset_indices(10, 3, "sample", 0) == sorted(random.Random(0).sample(range(10), 3))
    assert len(set(subset_indices(50, 50, "hf-shuffle", 42))) == 50


def test_hott_refuses_a_dataset_it_never_ran_and_a_system_prompt():
    with pytest.raises(ConfigError, match="no 'hott' prompt"):
        plan(RunConfig(model="tiny-llama", dataset="arith", protocol="hott"))
    with pytest.raises(ConfigError, match="raw text"):
        plan(RunConfig(model="tiny-llama", dataset="gsm8k", protocol="hott", system_prompt="be brief"))
    with pytest.raises(ConfigError, match="unknown --protocol"):
        get_protocol("hot")


def test_protocols_set_decoding_and_options_override():
    from kvbench.runs.plan import decoding

    assert decoding(RunConfig(protocol="hott")) == {"temperature": 0.0, "top_p": 1.0, "top_k": 0,
                                                    "repetition_penalty": 1.0}
    sampled = decoding(RunConfig(protocol="hott-sampling"))
    assert sampled == {"temperature": 0.7, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.2}
    assert decoding(RunConfig(protocol="hott-sampling", temperature=0.0))["temperature"] == 0.0
    for bad in (dict(temperature=float("nan")), dict(repetition_penalty=0.0), dict(top_k=-1), dict(top_p=0.0)):
        with pytest.raises(ConfigError):
            decoding(RunConfig(**bad))


# --- the fork's extractors and scorers on hand-made responses -------------------------------------------------


def test_hott_default_extractor_behaves_as_the_fork():
    assert hott_default("  42 ") == "42"
    assert hott_default("So the total is \\boxed{18} dollars.") == "18"
    assert hott_default("first \\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert hott_default("\\boxed{\\text{A}}") == "\\text{A}"  # its \text{} unwrapping crashes and is caught
    assert hott_default("The answer is $18.00. Done") == "$18"  # lower-cased, cut at the first period
    assert hott_default("I pick option C\nbecause") == "c"
    assert hott_default("no idea") is None  # a space is not alphabetic, and no flag matches: the fork's ""
    assert hott_default("Paris") == "Paris"  # a single word is taken whole
    assert hott_default("12 apples, 3 pears") is None


def test_hott_label_extractors_are_the_forks_strategyqa_and_folio_extractors():
    # what reason/strategyqa.py's and reason/folio.py's extractors (43d9e37) return, "" written as None
    cases = {
        "so \\boxed{\\text{True}}": ("True", "True"),
        "false": ("false", "false"), " True ": ("true", "True"),
        "Uncertain": (None, "Uncertain"), " uncertain ": (None, "uncertain"),  # strategyqa knows no "uncertain"
        "Answer: Uncertain.": ("uncertain", "uncertain"), "The answer is: uncertain": (": uncertain", ": uncertain"),
        "\\boxed{Uncertain}": ("Uncertain", "Uncertain"), "uncertain.": (None, None), "**Uncertain**": (None, None),
    }
    for response, (strategyqa, folio) in cases.items():
        assert (hott_strategyqa(response), hott_folio(response)) == (strategyqa, folio), response


def test_hott_strategyqa_prompt_is_the_forks_on_every_local_row():
    """``strategyqa_formatter`` (reason/strategyqa.py @43d9e37, lines 8-14) on every one of the 2,290 local rows:
    the question as stored, trailing spaces included (31 rows end in one)."""
    task, examples = hott_examples("strategyqa")
    prompt = "Given some facts and a related question, answer the question with true or false."
    prefix = 'Solve the problem step by step. Answer with true or false and wrap your final answer in "\\boxed{}".'
    records = {}
    for split in ("dev", "train"):
        for line in (SHARED_DATA / "strategyqa" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            records[record["qid"]] = record
    assert len(examples) == len(records) == 2290
    spaced = 0
    for example in examples:
        record = records[example.id]
        spaced += record["question"] != record["question"].strip()
        fork = f"{prompt}\\Facts:\n{record['facts']}\\Question:\n{record['question']}\n{prefix}"
        assert task.user_content(example)[0] == fork, example.id
    assert spaced == 31


def test_hott_scorers_are_string_comparisons():
    assert hott_exact("18", "18")[0] and not hott_exact("18.00", "18")[0] and not hott_exact("18", "1,8")[0]
    assert hott_exact_ci("c", "C")[0]
    assert hott_drop_chars("4", "['4']")[0] and hott_drop_chars("[", "['4']")[0]
    assert not hott_drop_chars("42", "['42']")[0]  # only one-character predictions can ever score


def test_hott_task_scores_the_whole_response():
    task = load_task("gsm8k").for_protocol(HOTT)
    scored = task.score("<think>maybe \\boxed{3}</think> so \\boxed{4}", "4", prompt="x<think>\n")
    assert scored.extracted == "4" and scored.correct
    assert task.score("\\boxed{3} and I keep thinking", "3", prompt="x<think>\n").correct  # no <think> handling


def test_repetition_stop_equals_the_forks_scan():
    def fork_rule(tokens, min_repeat=5, ngram_min=2, ngram_max=10, window=200):
        if len(tokens) < ngram_min * min_repeat:
            return False
        tail = tokens[-window:]
        for n in range(ngram_min, ngram_max + 1):
            for i in range(len(tail) - n * min_repeat + 1):
                if all(tail[i + r * n: i + (r + 1) * n] == tail[i:i + n] for r in range(min_repeat)):
                    return True
        return False

    rule, rng, checked = RepetitionStop(), random.Random(0), 0
    for _ in range(60):
        tokens, stopped = [], False
        pattern = [rng.randrange(3) for _ in range(rng.randint(2, 12))]
        for t in range(220):
            tokens.append(pattern[t % len(pattern)] if rng.random() < 0.9 else rng.randrange(3))
            # applied after every token, the two rules stop at the same token
            assert rule.hit(tokens) == fork_rule(tokens), tokens
            checked += 1
            if rule.hit(tokens):
                stopped = True
                break
        assert stopped or len(tokens) == 220
    assert checked > 1000


# --- reasoning models: the prompt opens <think>, think tags are special tokens --------------------------------

R1_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")


@pytest.fixture(scope="module")
def r1_tokenizer():
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<s>", "additional_special_tokens": ["<|im_start|>", "<think>",
                                                                                   "</think>"]})
    bos = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tokenizer.chat_template = R1_TEMPLATE
    return tokenizer


def codec(tokenizer, task, protocol):
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[tokenizer.eos_token_id, 7]))
    return Codec(tokenizer, model, task.for_protocol(protocol), protocol)


def test_think_tags_survive_decoding_under_kvbench_only(r1_tokenizer):
    task = load_task("gsm8k")
    ids = r1_tokenizer("reasoning</think>The answer is 4.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert codec(r1_tokenizer, task, KVBENCH).decode(ids) == "reasoning</think>The answer is 4."
    assert codec(r1_tokenizer, task, HOTT).decode(ids) == "reasoningThe answer is 4."  # the fork's decode


def test_hott_feeds_raw_text_with_bos_and_kvbench_the_template(r1_tokenizer):
    task = load_task("gsm8k")
    example = SimpleNamespace(fields={"question": "What is 2+2?"}, gold="4", id="q")
    raw = codec(r1_tokenizer, task, HOTT)
    prompt = raw.prompt(example)
    assert prompt == 'What is 2+2?\nSolve the problem step by step. Wrap your final answer in "\\boxed{}".'
    assert raw.encode(prompt)[0] == r1_tokenizer.bos_token_id
    chat = codec(r1_tokenizer, task, KVBENCH)
    assert chat.prompt(example).endswith("<|im_start|>assistant\n<think>\n") and opens_thinking(chat.prompt(example))
    assert chat.encode(chat.prompt(example))[0] != r1_tokenizer.bos_token_id
    assert raw.eos == (r1_tokenizer.eos_token_id,) and chat.eos == (r1_tokenizer.eos_token_id, 7)


CASES = {  # dataset -> (a response that finished its reasoning with the right answer, the gold)
    "gsm8k": ("12 + 6 = 18</think>The answer is 18.", "18"),
    "math500": ("so it is 1/2</think>\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    "commonsense_qa": ("it must be B</think>The answer is B.", "B"),
    "strategyqa": ("yes it is</think>The answer is yes.", "yes"),
    "folio": ("so it follows</think>The answer is True.", "True"),
    "drop": ("count: 3</think>The answer is 3.", '[["3"]]'),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_truncated_r1_trace_is_invalid_and_a_finished_one_is_scored_after_think(name):
    task = load_task(name).for_protocol(KVBENCH)
    finished, gold = CASES[name]
    reasoning, answer = finished.split("</think>")
    opened = "<|im_start|>assistant\n<think>\n"
    truncated = task.score(f"{reasoning} ... {answer} and then", gold, prompt=opened)
    assert truncated.extracted is None and not truncated.correct  # no </think>: no answer, whatever it wrote
    scored = task.score(finished, gold, prompt=opened)
    assert scored.correct, scored
    wrong_inside = task.score(f"{reasoning} The answer is 999.</think>{answer}", gold, prompt=opened)
    assert wrong_inside.correct  # what the reasoning said does not count
    # a prompt that does not open a think block: an untagged response is the answer itself
    assert task.score(answer, gold, prompt="<|im_start|>assistant\n").correct


def test_per_model_system_prompt():
    assert default_system_prompt("nvidia/Llama-3.1-Nemotron-Nano-8B-v1") == "detailed thinking on"
    assert default_system_prompt("/models/Llama-3.1-Nemotron-Nano-8B-v1/") == "detailed thinking on"
    assert default_system_prompt("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B") is None
    nemotron = "nvidia/Llama-3.1-Nemotron-Nano-8B-v1"
    task, _, _ = plan(RunConfig(model=nemotron, dataset="arith"))
    assert task.messages(SimpleNamespace(fields={"question": "1+1"}))[0] == {"role": "system",
                                                                             "content": "detailed thinking on"}
    task, _, _ = plan(RunConfig(model=nemotron, dataset="arith", system_prompt=""))
    assert task.messages(SimpleNamespace(fields={"question": "1+1"}))[0]["role"] == "user"
    assert len({t.prompt_hash for t in (task, plan(RunConfig(model=nemotron, dataset="arith"))[0])}) == 2


def test_protocol_names():
    assert set(PROTOCOLS) == {"kvbench", "hott", "hott-sampling"}
