"""Protocols: everything outside the cache that shapes a number, as one named, declarative choice.

A protocol fixes the prompt format (chat template or raw text, system prompt), the dataset's prompt, answer
format and scorer (from the dataset config's ``protocols:`` block), the subset draw of ``--num-samples``, the
stopping rule and the decoding defaults. It is part of the run key and of every report's cell identity.

- ``kvbench``: the model's chat template (and the system prompt a model needs to reason), per-dataset answer
  formats, faithful extractors and scorers, a reasoning model's ``<think>`` block stripped before extraction.
- ``hott``: the paper's harness (the kvpress fork, ``reason/`` at 43d9e37) as its code ran from 2025-10-06:
  raw prompt text tokenised with the tokenizer's special tokens (no chat template, no system prompt), the
  fork's prompts and ``\\boxed{}`` answers, its extractors and string scorers (their defects included), the
  whole response searched, ``shuffle(seed=42).select(range(n))`` subsets, greedy decoding that stops at the
  tokenizer's EOS or at the fork's repetition rule.
- ``hott-sampling``: the same before 2025-10-06: sampling at temperature 0.7, top-p 0.9, repetition penalty
  1.2 (and transformers' default top-k 50), the generation config's EOS ids, no repetition stop.

This module knows nothing about torch: the engine receives the decoding settings it resolves.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvbench.errors import ConfigError


@dataclass(frozen=True)
class Protocol:
    name: str
    summary: str
    #: The dataset config's ``protocols:`` block that supplies prompt, gold, extractors and scorer (None: its own).
    prompts: str | None = None
    #: Apply the model's chat template (and a system prompt). False: the raw prompt text, tokenised with the
    #: tokenizer's special tokens (a BOS where the tokenizer adds one), as ``tokenizer(text)`` does.
    chat_template: bool = True
    #: Extract answers after a reasoning model's ``</think>`` (none from an unfinished think block).
    strip_thinking: bool = True
    #: Decode keeping ``<think>``/``</think>`` where the tokenizer marks them special; False skips every special.
    keep_think_tags: bool = True
    #: EOS ids: "all" (the generation config's and the tokenizer's), "tokenizer" or "generation_config".
    eos: str = "all"
    #: ``--num-samples`` draw: "sample" (sorted ``random.Random(seed).sample``) or "hf-shuffle" (``datasets``'
    #: ``shuffle(seed=seed).select(range(n))``, in shuffled order).
    subset: str = "sample"
    subset_seed: int = 0
    #: Stop at the fork's repetition rule (a 2- to 10-gram repeated 5 times back to back in the last 200 tokens).
    repetition_stop: bool = False
    #: Decoding defaults (``--temperature`` and the others override them): 0 = greedy.
    temperature: float = 0.0
    top_p: float = 1.0
    #: 0 = no top-k filter.
    top_k: int = 0
    repetition_penalty: float = 1.0
    #: Raised when what a protocol feeds the model changes, so stored runs are not reused as its own.
    revision: int = 1

    @property
    def raw_text(self) -> bool:
        return not self.chat_template


KVBENCH = Protocol(
    "kvbench", "chat template (+ a model's reasoning system prompt), per-dataset answer formats, faithful scorers, "
    "<think> stripped, seeded subset, greedy",
)
HOTT = Protocol(
    "hott", "the fork's reason/ code from 2025-10-06: raw text + BOS, \\boxed{} prompts, its extractors and string "
    "scorers, shuffle(seed=42) subset, greedy, tokenizer EOS, repetition stop",
    prompts="hott", chat_template=False, strip_thinking=False, keep_think_tags=False, eos="tokenizer",
    subset="hf-shuffle", subset_seed=42, repetition_stop=True,
    revision=2,  # BOS as transformers 4.51.3 put it; StrategyQA's question unstripped (1: the installed tokenizer's)
)
HOTT_SAMPLING = Protocol(
    "hott-sampling", "the fork's reason/ code before 2025-10-06: as hott, but sampling (temperature 0.7, top-p 0.9, "
    "top-k 50, repetition penalty 1.2), generation-config EOS, no repetition stop",
    prompts="hott", chat_template=False, strip_thinking=False, keep_think_tags=False, eos="generation_config",
    subset="hf-shuffle", subset_seed=42, temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.2,
    revision=2,  # as hott's
)
PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (KVBENCH, HOTT, HOTT_SAMPLING)}
DEFAULT_PROTOCOL = KVBENCH.name


def get_protocol(name: str | None) -> Protocol:
    """The protocol called ``name`` (None: the default); one clear error otherwise."""
    name = DEFAULT_PROTOCOL if name is None else name  # "" is a name, and not a protocol
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown --protocol {name!r} (known: {', '.join(PROTOCOLS)})")
    return PROTOCOLS[name]
