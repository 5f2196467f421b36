"""Whether the paper's harness put a BOS token before a raw prompt: transformers 4.51.3's rule, model by model.

The fork (``reason/evaluate.py`` at 43d9e37, ``req.txt``: transformers 4.51.3) loads ``AutoTokenizer`` and
tokenises the raw prompt with ``tokenizer(input_text)``. In that release a ``LlamaTokenizerFast`` rebuilds its
post-processor from ``add_bos_token`` (default true; ``tokenization_llama_fast.py``, ``update_post_processor``)
whatever ``tokenizer.json`` holds, and the tokenizer of a GGUF file of a Llama-architecture model is a
``LlamaTokenizerFast`` built with that default (``integrations/ggml.py``, ``GGUFLlamaConverter``); every other
tokenizer applies its ``tokenizer.json`` post-processor, as later releases do. transformers 5 builds some of these
differently (the embedded SmolLM2 GGUF gets no BOS there, where the fork's stack put id 1 first), so the raw-text
protocols decide BOS by the 4.51.3 rule, not by the installed tokenizer.

The paper's four models all get a BOS: DeepSeek-R1-Distill-Llama-8B and -Qwen-7B (``LlamaTokenizerFast``,
``add_bos_token: true``), Llama-3.1-8B-Instruct and Llama-3.1-Nemotron-Nano-8B-v1 (``PreTrainedTokenizerFast``
whose post-processor prepends ``<|begin_of_text|>``); ``tests/fixtures/tokenizers`` holds their configurations.
"""

from __future__ import annotations

import json
from pathlib import Path

#: Tokenizer classes whose 4.51.3 fast tokenizer takes BOS from ``add_bos_token``.
LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")
#: Model types 4.51.3 gives a Llama tokenizer when ``tokenizer_config.json`` names no class (its
#: ``TOKENIZER_MAPPING``), and GGUF architectures it converts with ``GGUFLlamaConverter``.
LLAMA_MODEL_TYPES = ("llama", "mistral", "mixtral")


def fork_adds_bos(tokenizer_config: dict | None, model_type: str | None, gguf: bool = False) -> bool | None:
    """True or False where transformers 4.51.3 decides BOS from ``add_bos_token``; None where the tokenizer's own
    post-processor decides (the same in every release)."""
    if gguf:
        return True if model_type == "llama" else None
    config = tokenizer_config or {}
    name = config.get("tokenizer_class") or ("LlamaTokenizerFast" if model_type in LLAMA_MODEL_TYPES else None)
    if name not in LLAMA_CLASSES:
        return None
    return bool(config.get("add_bos_token", True))


def encode_raw(tokenizer, text: str, bos: bool | None) -> list[int]:
    """``tokenizer(text)`` as the fork's stack tokenised it: the text's ids, after a BOS where ``bos`` says so (None:
    the tokenizer's own special tokens)."""
    if bos is None:
        return list(tokenizer(text)["input_ids"])
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return [tokenizer.bos_token_id, *ids] if bos and tokenizer.bos_token_id is not None else ids


def tokenizer_config(path: str, source: str, revision: str | None = None) -> dict | None:
    """The ``tokenizer_config.json`` of a model directory or of a hub model in the local cache, if it has one."""
    if source == "dir":
        found: str | Path | None = Path(path) / "tokenizer_config.json"
    elif source == "hf":
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        found = try_to_load_from_cache(path, "tokenizer_config.json", revision=revision)
    else:
        return None
    if not isinstance(found, (str, Path)) or not Path(found).is_file():
        return None
    try:
        return json.loads(Path(found).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
