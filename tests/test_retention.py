"""Critical-token retention on a hand-made prompt with known quantity and name tokens."""

from kvbench.engine.generate import GenerationSettings, generate
from kvbench.presses import make_press
from kvbench.runs.measurement_columns import critical_token_positions
from kvbench.tasks import Example, load_task
from kvbench.tasks.critical import critical_spans

QUESTION = "Ava has 12 apples. Ben gives Ava 7 more apples. How many apples does Ava have now?"


def test_critical_spans_are_quantities_and_names():
    assert [QUESTION[a:b] for a, b in critical_spans(QUESTION)] == ["Ava", "12", "Ben", "Ava", "7", "Ava"]
    labels = critical_spans("Which is larger?\nA. 3 apples\nB. Two pears")
    assert [("Which is larger?\nA. 3 apples\nB. Two pears")[a:b] for a, b in labels] == ["A", "3", "B", "Two"]


def test_template_words_never_count():
    task = load_task("arith")  # its template says "Solve ... The answer is N." with capitals of its own
    example = Example(id="x", fields={"question": QUESTION}, gold="19")
    content, _ = task.user_content(example)
    assert [content[a:b] for a, b in task.critical_spans(example)] == ["Ava", "12", "Ben", "Ava", "7", "Ava"]


def test_token_positions_on_a_byte_tokenizer(tiny_llama):
    model, tokenizer = tiny_llama  # one token per character, except the chat template's special tokens
    task = load_task("arith")
    example = Example(id="x", fields={"question": QUESTION}, gold="19")
    prompt = tokenizer.apply_chat_template(task.messages(example), tokenize=False, add_generation_prompt=True)
    start = prompt.index(QUESTION)
    expected = []
    for word in ("Ava", "12", "Ben", "Ava ", "7", "Ava have"):
        at = prompt.index(word, expected[-1] + 1 if expected else start)
        length = len(word.split()[0])
        expected.extend(range(at, at + length))
    # special tokens are one token for many characters: shift the character offsets accordingly
    before = prompt[:start]
    shift = before.count("<|im_start|>") * (len("<|im_start|>") - 1) + before.count("<|im_end|>") * (
        len("<|im_end|>") - 1)
    assert critical_token_positions(tokenizer, task, example, prompt) == [p - shift for p in sorted(expected)]
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[expected[0] - shift:expected[2] - shift + 1]) == "Ava"


def test_retention_matches_the_kept_sets(tiny_llama):
    model, tokenizer = tiny_llama
    prompt = tokenizer(QUESTION)["input_ids"]
    critical = [i for a, b in critical_spans(QUESTION) for i in range(a, b)]
    for press, budget in (("full", None), ("streaming_llm", 24), ("h2o", 24), ("snapkv-d", 24)):
        kept = []

        def snapshot(cache, step, kept=kept):
            kept.append(cache.kept_positions(0))

        (out,) = generate(model, [prompt], make_press(press), budget, GenerationSettings(max_new_tokens=12),
                          critical_positions=[critical], on_step=snapshot)
        for step, snapshot in enumerate(kept):
            for layer, heads in enumerate(snapshot):
                expected = sum(len(set(critical) & h) / len(critical) for h in heads) / len(heads)
                assert abs(float(out.retention[layer, step]) - expected) < 1e-6, (press, step, layer)
        if press == "full":
            assert float(out.retention.min()) == 1.0
        else:
            assert float(out.retention[:, -1].mean()) < 1.0
