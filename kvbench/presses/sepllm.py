"""SepLLM: the initial tokens, the newest separators (punctuation, line breaks) and a local window."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kvbench.errors import KvbenchError
from kvbench.presses.base import INF, TOKEN_STATE, Press, View, protect
from kvbench.presses.ranking import slot_ranks

#: SepLLM's separators for Llama-3 (``kv_cache_manager.py`` line 89: ids 13, 11, 30, 0, 26, 25, 198, 220, 662, 1174,
#: 949, 758, 2652, 551, 720, 256, 262), as the Llama-3 tokenizer decodes them: looked up in the run's tokenizer.
SOURCE_SEPARATORS = (".", ",", "?", "!", ";", ":", "\n", " ", " .", " ,", " ?", " !", " ;", " :", " \n", "  ", "   ")


def separator_ids(tokenizer, texts=SOURCE_SEPARATORS) -> tuple[int, ...]:
    """The ids of the separator texts that are one token in ``tokenizer`` (in their order, without repeats)."""
    ids = []
    for text in texts:
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(int(encoded[0]))
    return tuple(ids)


@dataclass
class SepLLMPress(Press):
    """Keep the first ``n_init`` tokens, the newest ``sep_cache_size`` separators and the newest ``local_size``.

    Streaming-SepLLM's ``SepLLM_KVCache_Manager`` with ``SEP_ACCUMULATION`` and ``USE_MAX_SEP_CACHE`` (its
    ``evaluate_streaming_inputs_perplexity.py``): ``--budget`` is its ``cache_size`` c, the most the cache holds;
    a forward that leaves more compresses it to the initial tokens, the separators of what lies between them and
    the local window, the newest ``sep_cache_size`` of them (fewer if fewer were seen: SepLLM keeps no other token
    there), and the ``local_size`` newest. Defaults are its script's (c 324, init 4, s 64, w 224). Separators are
    the texts of its Llama-3 ids looked up in the model's tokenizer (``separators=auto``: on Llama-3 its very ids),
    or ``separators=13,11,...`` given as ids.

    Differences from the source (``tests/reference/test_sepllm.py``): keys keep their original positions (SepLLM
    re-rotates them to their place in the cache, ``enable_pos_shift``); a prompt of more than c + 1 tokens is
    compressed once, after the prefill (SepLLM's evaluation feeds one token per forward, so it compresses during
    the prompt and still holds uncompressed entries after it); each sequence keeps its own separators (in a batch
    SepLLM keeps each row's oldest ``min`` over the batch of its window's separator count); any tokenizer (SepLLM
    names ids for Llama-3, Pythia and Falcon only, by ``model_type``); ``sep_cache_size`` 0 keeps no separator
    (SepLLM's script refuses it).
    """

    name = "sepllm"
    summary = "initial tokens + the newest separators (punctuation, line breaks) + a local window"
    source = "Chen et al. 2024, arXiv 2412.12094 (SepLLM)"
    reference = ("HKUDS/SepLLM@f250f59 Streaming-SepLLM/sepllm_kv_cache/kv_cache_manager.py "
                 "(SepLLM_KVCache_Manager.compress_kv_cache_and_tokids)")
    reads_whole_window = False
    reads_tokens = True
    keeps_fewer = True

    #: Initial tokens always kept (SepLLM's ``init_cache_size``: 4).
    n_init: int = 4
    #: Separators kept at most (SepLLM's ``sep_cache_size``, s: its script's 64).
    sep_cache_size: int = 64
    #: Newest tokens always kept (SepLLM's ``local_size``, w: 224).
    local_size: int = 224
    #: ``auto`` (SepLLM's Llama-3 separators, found in the model's tokenizer) or token ids, comma-separated.
    separators: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("n_init", "sep_cache_size", "local_size"):
            if getattr(self, field) < 0:
                raise ValueError(f"sepllm: {field} must be >= 0, got {getattr(self, field)}")
        if self.buffer != 1:
            raise ValueError("sepllm: buffer does not apply (it compresses after any forward that leaves more than its "
                             "cache_size, --budget)")
        if self.local_size < 1:
            raise ValueError("sepllm: local_size must be >= 1 (the token just written is always kept)")
        self.separator_ids = None if self.separators == "auto" else _parse_ids(self.separators)

    def cadence(self, budget: int) -> tuple[int, int]:
        keep = self.n_init + self.sep_cache_size + self.local_size
        if keep >= budget:
            raise KvbenchError(f"sepllm: --budget (its cache_size, {budget}) must exceed n_init + sep_cache_size + "
                             f"local_size = {keep}, or nothing would be left between compressions")
        return keep, budget + 1

    def for_tokenizer(self, tokenizer) -> SepLLMPress:
        if self.separator_ids is not None:
            return self
        found = separator_ids(tokenizer)
        if not found:
            raise ValueError("sepllm: none of SepLLM's separators is one token in this tokenizer; give "
                             "-a separators=ID,ID,...")
        return dataclasses.replace(self, separators=",".join(map(str, found)))

    def score(self, view: View) -> torch.Tensor:
        if self.separator_ids is None:
            raise ValueError("sepllm: separators=auto is resolved from the model's tokenizer, which this run did "
                             "not give; pass -a separators=ID,ID,...")
        ids = torch.tensor(self.separator_ids, device=view.keys.device, dtype=torch.float32)
        kept = protect(torch.zeros_like(view.positions, dtype=torch.float32), view, n_sink=self.n_init,
                       recent=self.local_size) == INF
        between = torch.isin(view.state[TOKEN_STATE], ids) & view.valid & ~kept
        newest = slot_ranks(torch.where(between, view.positions.float(), -INF), view.positions) < self.sep_cache_size
        return torch.where(kept | (between & newest), INF, -INF)  # exactly these are kept (``keeps_fewer``)


def _parse_ids(text: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"sepllm: separators must be 'auto' or token ids separated by commas, got {text!r}") from None
    if not ids or min(ids) < 0 or max(ids) >= 2**24:
        raise ValueError(f"sepllm: separators must be token ids in [0, 2**24), got {text!r}")
    return ids
