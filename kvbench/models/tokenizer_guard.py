"""A check, at load time, that the tokenizer transformers built encodes text as the model's own files do.

transformers 5.3 to 5.21 may build a ``LlamaTokenizer`` with a Metaspace pre-tokenizer over a byte-level BPE
(DeepSeek-R1-Distill-Llama, and R1-Distill-Qwen on 5.6-5.7; transformers issues #45488 and #48206, fixed for hub
ids from 5.13 and for local directories only in 5.22): every space is dropped, and accuracy collapses with no
error. The guard encodes a probe sentence with the loaded tokenizer and with the ``tokenizers`` library reading the
repository's ``tokenizer.json`` directly; on a mismatch it loads the fast tokenizer from that file (keeping the
special tokens and chat template) and warns, or fails with one line when even that disagrees. Without a
``tokenizer.json`` (GGUF, SentencePiece-only) it checks that the probe survives an encode/decode round trip.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kvbench.errors import KvbenchError

PROBE = "The answer is 42. Let's check: 3 + 4 = 7, so it isn't 8 (see Table 2)."
_SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token")


class TokenizerError(KvbenchError):
    """The loaded tokenizer does not encode text as the model's files do."""


def probe_ids(tokenizer) -> list[int]:
    return list(tokenizer.encode(PROBE, add_special_tokens=False))


def reference_ids(tokenizer_json: Path) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_json)).encode(PROBE, add_special_tokens=False).ids


def checked_tokenizer(tokenizer, tokenizer_json: Path | None, model: str):
    """``tokenizer`` if it encodes the probe as ``tokenizer_json`` does, else the file's own fast tokenizer."""
    import transformers

    if tokenizer_json is None:
        text = tokenizer.decode(probe_ids(tokenizer), skip_special_tokens=True)
        if text.strip() != PROBE:
            raise TokenizerError(f"the tokenizer of {model} does not round-trip text ({PROBE!r} decodes as "
                                 f"{text!r}): load a tokenizer that matches the model")
        return tokenizer
    expected = reference_ids(tokenizer_json)
    if probe_ids(tokenizer) == expected:
        return tokenizer
    repaired = fast_tokenizer(tokenizer_json, tokenizer)
    cause = (f"transformers {transformers.__version__} built a {type(tokenizer).__name__} that encodes text "
             f"differently from {tokenizer_json.name} (the byte-level BPE space bug of transformers 5.3-5.21)")
    if probe_ids(repaired) != expected:
        raise TokenizerError(f"{model}: {cause}; upgrade transformers to >= 5.22 or load the fast tokenizer from "
                             f"{tokenizer_json} directly")
    print(f"warning: {model}: {cause}; using the fast tokenizer read from {tokenizer_json.name} instead "
          "(upgrade transformers to >= 5.22 to silence this)", file=sys.stderr)
    return repaired


def fast_tokenizer(tokenizer_json: Path, like):
    """The tokenizer ``tokenizer_json`` defines, with the special tokens and chat template of ``like``."""
    from transformers import PreTrainedTokenizerFast

    specials = {name: str(getattr(like, name)) for name in _SPECIALS if getattr(like, name, None) is not None}
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), **specials)
    fast.chat_template = getattr(like, "chat_template", None)
    return fast


def tokenizer_file(path: str, source: str, revision: str | None = None) -> Path | None:
    """The ``tokenizer.json`` of a model directory or of a hub model in the local cache, if it has one."""
    if source == "dir":
        candidate = Path(path) / "tokenizer.json"
        return candidate if candidate.is_file() else None
    if source != "hf":
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(path, "tokenizer.json", revision=revision)
    return Path(found) if isinstance(found, str) else None
