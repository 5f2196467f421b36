"""sepllm against SepLLM's own ``SepLLM_KVCache_Manager``, driven as its streaming evaluation drives it.

Source: HKUDS/SepLLM @ f250f59 (read with line numbers; transcribed without kvbench's press or its docs).

- ``Streaming-SepLLM/sepllm_kv_cache/kv_cache_manager.py``, ``SepLLM_KVCache_Manager``: ``__init__`` (55-97):
  ``sep_exrange = 0`` (81), ``max_sep_exidx = sep_cache_size + init_cache_size`` (82), the llama separators
  ``[13, 11, 30, 0, 26, 25, 198, 220, 662, 1174, 949, 758, 2652, 551, 720, 256, 262]`` (89: Llama 3's ``. , ? ! ;
  :``, newline, space, then the same with a leading space, two and three spaces). ``evict_except_for_sep``
  (324-343): nothing while ``seq_len <= cache_size``, else ``compress_kv_cache_and_tokids`` (257-321) with
  ``SEP_ACCUMULATION`` and ``USE_MAX_SEP_CACHE`` True: the cache in physical order is initial ``[0, I)``,
  separator cache ``[I, sep_exrange)``, past window ``[sep_exrange, seq_len - W)``, local ``[seq_len - W, seq_len)``
  (270-285, ``sep_exrange`` starting at ``I``, 270-271); ``compress_past_win_2_seps`` (203-247) keeps the past
  window's entries whose ``past_tok_ids`` is a separator, per row the first ``min_sep_num`` (the batch's minimum,
  209-219); the old separators (unless ``sep_exrange == I``, 279-282) then the new ones (289-290), cut to the
  *last* ``S`` (300-304); ``sep_exrange`` = ``I`` + what is kept (304, 306); the cache becomes initial +
  separators + local (315-318): every non-separator of the past window goes. ``update_past_tok_ids`` (251-255)
  appends a forward's ids. Every layer and head is sliced by the same indices. ``slice_kv_cache_and_tokids``'s
  ``CHECK_IDX`` asserts (156-165) and line 273 are kept in the transcription.
- ``Streaming-SepLLM/main/evaluate_streaming_inputs_perplexity.py`` 40-48, 82-114: the manager built from the
  arguments and ``model_type`` (no ``separator_token_ids``: llama's list); the text fed one token per forward (91-94),
  after each ``update_past_tok_ids`` (106) then ``kv_cache(past_key_values, SEP_ACCUMULATION=True,
  USE_MAX_SEP_CACHE=True)`` (114).
- ``Streaming-SepLLM/sepllm_kv_cache/utils.py`` 50-53 (defaults: cache_size 324, init 4, sep 64, local 224; the
  manager's own default ``sep_cache_size`` is 32, line 58, the script passes 64), 62-76 (``check_args``:
  ``local_size > 0``, ``sep_cache_size > 0``, ``a + s + w < c``).

``SepLLMCache`` transcribes the manager on rows of (position, token id) entries in its physical order, batches
included; ``test_transcription`` checks it against the source's own class, executed from the mirror, after every
token (8 settings, batches of 1-3; a wider sweep while writing this, 200 random settings x 100 tokens, batches of
1-3: identical positions, token ids and ``sep_exrange`` throughout).

Claim: ``make_press("sepllm", {"n_init": I, "sep_cache_size": S, "local_size": W, "separators": ids})`` at
``--budget C`` is the manager with ``init_cache_size=I, sep_cache_size=S, local_size=W, cache_size=C,
separator_token_ids=ids``, compressing after every forward, one sequence. Found: identical kept sets at every
forward, layer and KV head whenever the prompt has at most ``C + 1`` tokens -- seeded (groups 1, 2, 7; I/S/W/C/P
4/3/6/14/10, 0/3/6/12/10, 2/8/1/12/10, 4/2/5/12/12, 4/16/6/30/24, 1/5/3/20/20, 3/4/4/16/8 and 2/3/2/10/10, over
separator rates mixed (a stretch with almost none), sparse (the separator cache never fills), dense, none, all:
24 runs, 524 of 524 compressions identical; the script's defaults 4/64/224/324 with a 300-token prompt: 3 runs, 9
of 9) and in situ (tiny llama, ``separators=auto``, a 29-token prompt cut to C where C is smaller, I/S/W/C 4/8/12/30,
0/3/16/24, 2/24/1/32, 4/6/10/21, groups 1, 2, 7: 12 runs, 145 of 145). kvbench refuses what ``check_args`` refuses
(``test_refusals``). A wider sweep while writing this (400 random settings, prompts 1 to 2C + 3, the longer ones
against ``prefill="one"``): 5,383 of 5,383 compressions identical. Named differences:

1. The prefill (``test_prompt_longer_than_budget``, ``test_prompt_threshold``): the script feeds a prompt one token
   per forward, so with more than ``C + 1`` tokens it compresses during the prompt and, after it, still holds the
   past window's entries not yet compressed; kvbench's prefill is one forward, compressed once, its past window
   ``[I, P - W)`` reduced to its last ``S`` separators. At forward 0 kvbench holds exactly initial + those
   separators + local, a strict subset of the script's cache (9 of 9 runs differ there, e.g. I/S/W/C/P
   4/3/6/20/40: 13 entries against 16); with the prompt as one forward in the reference (``prefill="one"``), the
   manager's own rule on that forward, identical at every forward (9 runs, 106 of 106). Prompts of C and C + 1
   tokens are identical either way (at C + 1 the script's one compression sees the same window); at C + 2 the
   script also holds the entry at ``C + 1 - W``.
2. Positions: the script re-rotates cached keys to their cache positions (``enable_pos_shift``, utils.py 54);
   kvbench keeps each key at its original position. Not visible in kept sets.
3. Batches (``test_batch_min_sep_num``): the source keeps, of each row's new separators, the oldest ``min_sep_num``
   of the batch (219); kvbench treats each sequence alone, as the source does a batch of one.

Found besides: ``sep_cache_size`` 0 (``test_no_separator_cache``) is refused by ``check_args`` (75) and makes the
manager fail at the first compression whose past window holds a separator (line 303's slice ``[sep_len,
sep_len)``); kvbench takes it and keeps no separator (the rule with no separators). ``separators=auto`` resolves
the Llama-3 separator texts in the model's tokenizer (``test_llama3_separators``: on Llama 3's vocabulary the
source's 17 ids in its order; the repository's fixture tokenizer is reduced to bytes and yields the first 8); the
source picks its list by ``model_type`` alone (87-97), llama's ids for any llama-type model whatever its vocabulary,
and refuses other types (97).
"""

import dataclasses
import json
import pathlib
import subprocess
from contextlib import redirect_stdout
from io import StringIO

import pytest
import torch

from kvbench.errors import KvbenchError
from kvbench.presses import make_press
from tests.reference.harness import (
    GROUPS,
    assert_identical,
    compare,
    log,
    run_cache,
    synthetic_forwards,
    tiny_model,
    trace_model,
)

#: ``kv_cache_manager.py`` line 89: the separators of ``model_type`` llama ("llama3 8b"), in the source's order.
LLAMA_SEPARATORS = (13, 11, 30, 0, 26, 25, 198, 220, 662, 1174, 949, 758, 2652, 551, 720, 256, 262)
#: Their texts in Llama 3's vocabulary (byte-level symbols; read off a full Llama-3 ``tokenizer.json``).
LLAMA_SEPARATOR_SYMBOLS = (".", ",", "?", "!", ";", ":", "Ċ", "Ġ", "Ġ.", "Ġ,", "Ġ?", "Ġ!", "Ġ;", "Ġ:", "ĠĊ", "ĠĠ",
                           "ĠĠĠ")
FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "tokenizers" / "Llama-3.1-8B-Instruct"
MIRROR = pathlib.Path("/work/.mirror/HKUDS+SepLLM/repo")
COMMIT = "f250f59503f15cb26f7b1a6e83e12c20ff069eeb"
MANAGER = "Streaming-SepLLM/sepllm_kv_cache/kv_cache_manager.py"

#: The seeded cases' token ids: a vocabulary of 24, three of them separators (0 among them, as in Llama's list).
SEPARATORS = (0, 7, 11)
VOCAB = 24
#: Probability that a token is a separator, by position: ``mixed`` has a stretch (positions 30-59) with hardly any.
RATES = {
    "mixed": lambda p: 0.03 if 30 <= p < 60 else 0.35,
    "sparse": lambda p: 0.08,
    "dense": lambda p: 0.7,
    "none": lambda p: 0.0,
    "all": lambda p: 1.0,
}
PROMPT = "Tom has 12 apples; he buys 7."


# --- the source's manager, transcribed -------------------------------------------------------------------------


def _check_slice(length, start, end):
    """``slice_kv_cache_and_tokids``'s ``CHECK_IDX`` asserts (lines 157-165; no negative bounds occur here)."""
    assert 0 <= start < length, f"start:{start}, end:{end}, seq_len:{length}"
    assert 0 <= end <= length, f"start:{start}, end:{end}, seq_len:{length}"
    assert start < end, f"start:{start}, end:{end}, seq_len:{length}"


class SepLLMCache:
    """``SepLLM_KVCache_Manager`` (kv_cache_manager.py 54-343) called as ``kv_cache(past_key_values,
    SEP_ACCUMULATION=True, USE_MAX_SEP_CACHE=True)``, on rows (the batch) of (position, token id) entries in the
    cache's physical order. Every layer's and head's K/V is sliced by the same indices (``slice_kv_4_all_layers``,
    ``sep_1bat_select_on_2d``), so one list per row stands for all of them; ``past_tok_ids`` is the token list.

    ``oldest=True`` (a control, not the source) keeps the oldest separators at the ``USE_MAX_SEP_CACHE`` cut.
    """

    def __init__(self, init_cache_size, sep_cache_size, local_size, cache_size, separator_token_ids, rows=1,
                 oldest=False):
        self.init_cache_size = init_cache_size
        self.local_size = local_size
        self.cache_size = cache_size
        self.sep_cache_size = sep_cache_size
        self.separator_token_ids = list(separator_token_ids)
        self.sep_exrange = 0  # line 81
        self.max_sep_exidx = sep_cache_size + init_cache_size  # line 82
        self.entries = [[] for _ in range(rows)]  # past_key_values (positions) and past_tok_ids, per row
        self.oldest = oldest

    def positions(self, row=0):
        return [p for p, _ in self.entries[row]]

    def forward(self, positions, tokens):
        """The model's forward appends the rows' K/V to the cache; ``update_past_tok_ids`` (251-255) their ids;
        then the manager runs (evaluate_streaming_inputs_perplexity.py 98-114)."""
        for row, (ps, ts) in enumerate(zip(positions, tokens)):
            self.entries[row] += list(zip(ps, ts))
        self.evict_except_for_sep()

    def evict_except_for_sep(self):  # lines 324-343
        if len(self.entries[0]) <= self.cache_size:
            return
        self.compress_kv_cache_and_tokids()

    def compress_kv_cache_and_tokids(self):  # lines 257-321, SEP_ACCUMULATION and USE_MAX_SEP_CACHE both True
        seq_len = len(self.entries[0])
        init, local = self.init_cache_size, self.local_size
        if self.sep_exrange <= 0:  # 270-271
            self.sep_exrange = init
        assert seq_len - local > self.sep_exrange  # 273
        if init > 0:  # 276-277
            _check_slice(seq_len, 0, init)
        first = self.sep_exrange == init  # 279: before the first compression (or after one that found none)
        if not first:  # 281-282
            _check_slice(seq_len, init, self.sep_exrange)
        _check_slice(seq_len, self.sep_exrange, seq_len - local)  # 284: the past window
        _check_slice(seq_len, seq_len - local, seq_len)  # 285: the local window
        windows = [row[self.sep_exrange:seq_len - local] for row in self.entries]
        new_seps = self.compress_past_win_2_seps(windows)  # 287
        rows = []
        for row, new in zip(self.entries, new_seps):
            seps = new if first else row[init:self.sep_exrange] + new  # 289-296
            sep_len = len(seps)  # the same in every row: min_sep_num new ones each time
            if init + sep_len > self.max_sep_exidx:  # 300-304
                max_sep_len = self.max_sep_exidx - init
                _check_slice(sep_len, sep_len - max_sep_len, sep_len)
                seps = seps[:max_sep_len] if self.oldest else seps[sep_len - max_sep_len:sep_len]
            rows.append(row[:init] + seps + row[seq_len - local:])  # 315-318
        self.sep_exrange = min(init + sep_len, self.max_sep_exidx)  # 304, 306
        self.entries = rows

    def compress_past_win_2_seps(self, windows):  # lines 203-247
        found = [[(p, t) for p, t in window if t in self.separator_token_ids] for window in windows]  # 205-207
        min_sep_num = min(len(f) for f in found)  # 209-210: the batch's minimum
        return [f[:min_sep_num] for f in found]  # 218-219, 237-240: each row's first (oldest) min_sep_num


def reference(forwards, budget, n_init, sep_cache_size, local_size, separators, *, prefill="tokens",
              oldest=False):
    """kept[t][layer][head] of ``SepLLMCache(n_init, sep_cache_size, local_size, cache_size=budget)``.

    ``prefill="tokens"`` feeds the prompt one token per forward (the evaluation script, lines 91-114: every
    token its own forward, the manager after each); ``prefill="one"`` feeds it as one forward and calls the manager
    once (kvbench's prefill: difference 1). Later forwards are one token each either way.
    """
    cache = SepLLMCache(n_init, sep_cache_size, local_size, budget, separators, oldest=oldest)
    kept = []
    for t, forward in enumerate(forwards):
        positions, tokens = forward.positions.tolist(), forward.tokens.tolist()
        if t == 0 and prefill == "one":
            cache.forward([positions], [tokens])
        else:
            for p, token in zip(positions, tokens):
                cache.forward([[p]], [[token]])
        held = set(cache.positions())
        kept.append([[set(held) for _ in range(forward.keys.shape[1])] for _ in range(forward.layers)])
    return kept


# --- inputs --------------------------------------------------------------------------------------------------


def with_tokens(forwards, seed, rate):
    """``forwards`` with token ids: a separator (one of ``SEPARATORS``) with probability ``RATES[rate](position)``,
    otherwise another id of ``VOCAB``."""
    g = torch.Generator().manual_seed(1000 + seed)
    others = torch.tensor([i for i in range(VOCAB) if i not in SEPARATORS])
    out = []
    for f in forwards:
        n = f.positions.numel()
        p = torch.tensor([RATES[rate](int(q)) for q in f.positions])
        is_sep = torch.rand(n, generator=g) < p
        sep = torch.tensor(SEPARATORS)[torch.randint(0, len(SEPARATORS), (n,), generator=g)]
        other = others[torch.randint(0, len(others), (n,), generator=g)]
        out.append(dataclasses.replace(f, tokens=torch.where(is_sep, sep, other)))
    return out


def fixed_tokens(forwards, tokens):
    """``forwards`` carrying ``tokens`` (one id per position, in order)."""
    return [dataclasses.replace(f, tokens=torch.tensor([tokens[p] for p in f.positions.tolist()])) for f in forwards]


def press(n_init, sep_cache_size, local_size, separators=SEPARATORS):
    return make_press("sepllm", {"n_init": str(n_init), "sep_cache_size": str(sep_cache_size),
                                 "local_size": str(local_size), "separators": ",".join(map(str, separators))})


def compressions(kept, forwards):
    """Forwards at which ``kept`` dropped a position (or did not take in a new token)."""
    return compare(kept, kept, forwards).compressions


# --- the claim -----------------------------------------------------------------------------------------------

#: n_init (I), sep_cache_size (S), local_size (W), budget (C), prompt length (P), separator rate.
CASES = [
    (4, 3, 6, 14, 10, "mixed"),  # S smaller than the separators that leave the local window
    (0, 3, 6, 12, 10, "mixed"),  # I = 0
    (2, 8, 1, 12, 10, "mixed"),  # W = 1, C = I + S + W + 1
    (4, 2, 5, 12, 12, "dense"),  # C = I + S + W + 1, a prompt of C tokens
    (4, 16, 6, 30, 24, "sparse"),  # S larger than the separators available: the separator cache never fills
    (1, 5, 3, 20, 20, "mixed"),  # a prompt of C tokens
    (3, 4, 4, 16, 8, "none"),  # no separator at all
    (2, 3, 2, 10, 10, "all"),  # every token a separator
]


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize(("n_init", "sep_cache_size", "local_size", "budget", "prompt", "rate"), CASES)
def test_seeded(group, n_init, sep_cache_size, local_size, budget, prompt, rate):
    forwards = with_tokens(synthetic_forwards(group, group=group, prompt=prompt, steps=80), group, rate)
    theirs = reference(forwards, budget, n_init, sep_cache_size, local_size, SEPARATORS)
    kvbench = run_cache(press(n_init, sep_cache_size, local_size), budget, forwards)
    assert_identical(kvbench, theirs, forwards, "sepllm",
                     f"seeded group {group} I/S/W/C/P {n_init}/{sep_cache_size}/{local_size}/{budget}/{prompt} "
                     f"{rate}", min_compressions=max(5, compressions(theirs, forwards)))


@pytest.mark.parametrize("group", GROUPS)
def test_seeded_defaults(group):
    """The script's defaults (utils.py 50-53: cache_size 324, init 4, sep 64, local 224) are kvbench's."""
    forwards = with_tokens(synthetic_forwards(group, group=group, prompt=300, steps=150, layers=1), group, "mixed")
    theirs = reference(forwards, 324, 4, 64, 224, SEPARATORS)
    kvbench = run_cache(make_press("sepllm", {"separators": ",".join(map(str, SEPARATORS))}), 324, forwards)
    assert_identical(kvbench, theirs, forwards, "sepllm", f"seeded group {group} defaults 4/64/224/324/300",
                     min_compressions=3)


@pytest.mark.parametrize(("n_init", "sep_cache_size", "local_size", "budget", "prompt", "rate"),
                         [(4, 3, 6, 14, 10, "mixed"), (2, 8, 1, 12, 10, "mixed"), (4, 16, 6, 30, 24, "sparse")])
def test_control(n_init, sep_cache_size, local_size, budget, prompt, rate):
    """The comparison can fail: keeping the oldest separators at the cut, or one separator more, is caught."""
    forwards = with_tokens(synthetic_forwards(2, group=2, prompt=prompt, steps=80), 2, rate)
    kvbench = run_cache(press(n_init, sep_cache_size, local_size), budget, forwards)
    if rate != "sparse":  # the sparse case never reaches the cut, so ``oldest`` changes nothing there
        oldest = reference(forwards, budget, n_init, sep_cache_size, local_size, SEPARATORS, oldest=True)
        assert compare(kvbench, oldest, forwards).first_difference
    more = reference(forwards, budget + 1, n_init, sep_cache_size + 1, local_size, SEPARATORS)
    assert compare(kvbench, more, forwards).first_difference
    wide = reference(forwards, budget, n_init, sep_cache_size, local_size + 1, SEPARATORS)
    assert compare(kvbench, wide, forwards).first_difference


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize(("n_init", "sep_cache_size", "local_size", "budget"),
                         [(4, 8, 12, 30), (0, 3, 16, 24), (2, 24, 1, 32), (4, 6, 10, 21)])
def test_in_situ(group, n_init, sep_cache_size, local_size, budget):
    """Tiny llama, byte-level tokenizer: its separators (``auto``) are the ids of . , ? ! ; : newline and space.
    The prompt (29 tokens) is cut to the budget where the budget is smaller (a prompt of C tokens)."""
    model, tokenizer = tiny_model(group)
    prompt = tokenizer(PROMPT)["input_ids"][:budget]
    sepllm = make_press("sepllm", {"n_init": str(n_init), "sep_cache_size": str(sep_cache_size),
                                   "local_size": str(local_size)}).for_tokenizer(tokenizer)
    assert list(sepllm.separator_ids) == [tokenizer.convert_tokens_to_ids(s) for s in LLAMA_SEPARATOR_SYMBOLS[:8]]
    forwards, kept = trace_model(model, prompt, sepllm, budget, max_new_tokens=80)
    theirs = reference(forwards, budget, n_init, sep_cache_size, local_size, sepllm.separator_ids)
    assert_identical(kept, theirs, forwards, "sepllm",
                     f"tiny-llama group {group} I/S/W/C {n_init}/{sep_cache_size}/{local_size}/{budget} "
                     f"prompt {len(prompt)}", min_compressions=max(3, compressions(theirs, forwards)))


# --- named differences ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize(("n_init", "sep_cache_size", "local_size", "budget", "prompt", "rate"),
                         [(4, 3, 6, 20, 40, "mixed"), (0, 4, 5, 16, 40, "sparse"), (2, 8, 1, 16, 30, "mixed")])
def test_prompt_longer_than_budget(group, n_init, sep_cache_size, local_size, budget, prompt, rate):
    """Difference 1: the script feeds the prompt one token per forward and compresses whenever the cache exceeds C,
    so after the prompt it also holds the non-separators of the past window not yet compressed; kvbench's prefill
    is one forward, compressed once: its past window, ``[I, P - W)``, loses every non-separator. kvbench holds a
    strict subset at forward 0; with the prompt as one forward in the reference, identical at every forward."""
    forwards = with_tokens(synthetic_forwards(group, group=group, prompt=prompt, steps=80), group, rate)
    kvbench = run_cache(press(n_init, sep_cache_size, local_size), budget, forwards)
    tokenwise = reference(forwards, budget, n_init, sep_cache_size, local_size, SEPARATORS)
    case = f"seeded group {group} I/S/W/C/P {n_init}/{sep_cache_size}/{local_size}/{budget}/{prompt} {rate}"
    agreement = compare(kvbench, tokenwise, forwards)
    log("sepllm", case, agreement)
    assert agreement.forwards == 1 and agreement.first_difference
    tokens = forwards[0].tokens.tolist()
    window_seps = [p for p in range(n_init, prompt - local_size) if tokens[p] in SEPARATORS]
    expected = set(range(n_init)) | set(window_seps[len(window_seps) - min(sep_cache_size, len(window_seps)):]) | \
        set(range(prompt - local_size, prompt))
    for mine, source in zip(kvbench[0], tokenwise[0]):
        for a, b in zip(mine, source):
            assert a == expected and a < b
    one = reference(forwards, budget, n_init, sep_cache_size, local_size, SEPARATORS, prefill="one")
    assert_identical(kvbench, one, forwards, "sepllm", f"{case}, the prompt as one forward", min_compressions=10)


def test_prompt_threshold():
    """Difference 1's threshold: prompts of C and C + 1 tokens give identical kept sets (at C + 1 the script's
    one compression sees the same window); at C + 2 the script holds the token at C + 1 - W, kvbench drops it."""
    n_init, sep_cache_size, local_size, budget = 2, 3, 4, 12
    tokens = [1] * 200  # no separator in the prompt: all differences are in the past window's non-separators
    for i in range(30, 200, 3):
        tokens[i] = 7
    for prompt in (budget, budget + 1, budget + 2):
        forwards = fixed_tokens(synthetic_forwards(0, group=2, prompt=prompt, steps=40), tokens)
        kvbench = run_cache(press(n_init, sep_cache_size, local_size), budget, forwards)
        theirs = reference(forwards, budget, n_init, sep_cache_size, local_size, SEPARATORS)
        if prompt <= budget + 1:
            assert_identical(kvbench, theirs, forwards, min_compressions=5)
        else:
            assert {frozenset(b - a) for la, lb in zip(kvbench[0], theirs[0]) for a, b in zip(la, lb)} == \
                {frozenset({budget + 1 - local_size})}
            assert_identical(kvbench, reference(forwards, budget, n_init, sep_cache_size, local_size, SEPARATORS,
                                                prefill="one"), forwards, min_compressions=5)


def test_batch_min_sep_num():
    """Difference 3: in a batch the source keeps, of each row's new separators, the first (oldest) ``min_sep_num``,
    the batch's minimum (lines 209-219). Row 0's window holds separators at 2, 4 and 5, row 1's one at 3: in the
    batch row 0 keeps 2 alone; alone (kvbench runs each sequence alone, batch 1) it keeps all three."""
    n_init, sep_cache_size, local_size, budget = 1, 4, 2, 8
    rows = [[1, 1, 7, 1, 0, 11, 1, 1, 1], [1, 1, 1, 7, 1, 1, 1, 1, 1]]
    batch = SepLLMCache(n_init, sep_cache_size, local_size, budget, SEPARATORS, rows=2)
    alone = SepLLMCache(n_init, sep_cache_size, local_size, budget, SEPARATORS)
    for p in range(9):
        batch.forward([[p], [p]], [[rows[0][p]], [rows[1][p]]])
        alone.forward([[p]], [[rows[0][p]]])
    assert batch.positions(0) == [0, 2, 7, 8] and batch.positions(1) == [0, 3, 7, 8]
    assert alone.positions() == [0, 2, 4, 5, 7, 8]
    forwards = fixed_tokens(synthetic_forwards(0, group=2, prompt=8, steps=1), rows[0])
    assert run_cache(press(n_init, sep_cache_size, local_size), budget, forwards)[-1][0][0] == {0, 2, 4, 5, 7, 8}


def test_llama3_separators(tmp_path):
    """``separators=auto`` on Llama 3's tokenizer: the source's ids (line 89), in its order. The fixture's
    ``tokenizer.json`` is reduced to the 256 byte symbols, so it holds only the first eight (the one-character
    separators); with the other nine added to its vocabulary at their real ids, all seventeen."""
    from transformers import AutoTokenizer

    reduced = AutoTokenizer.from_pretrained(FIXTURE)
    assert [reduced.convert_ids_to_tokens(i) for i in LLAMA_SEPARATORS[:8]] == list(LLAMA_SEPARATOR_SYMBOLS[:8])
    assert all(reduced.convert_ids_to_tokens(i) is None for i in LLAMA_SEPARATORS[8:])
    assert make_press("sepllm").for_tokenizer(reduced).separator_ids == LLAMA_SEPARATORS[:8]

    spec = json.loads((FIXTURE / "tokenizer.json").read_text(encoding="utf-8"))
    for i, symbol in zip(LLAMA_SEPARATORS[8:], LLAMA_SEPARATOR_SYMBOLS[8:]):
        assert symbol not in spec["model"]["vocab"] and i not in spec["model"]["vocab"].values()
        spec["model"]["vocab"][symbol] = i
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text((FIXTURE / "tokenizer_config.json").read_text(encoding="utf-8"),
                                                    encoding="utf-8")
    full = AutoTokenizer.from_pretrained(tmp_path)
    assert [full.convert_ids_to_tokens(i) for i in LLAMA_SEPARATORS] == list(LLAMA_SEPARATOR_SYMBOLS)
    assert tuple(make_press("sepllm").for_tokenizer(full).separator_ids) == LLAMA_SEPARATORS


# --- found differences: the arguments ------------------------------------------------------------------------


def test_refusals():
    """``check_args`` (utils.py 62-76) refuses a + s + w >= c (76) and local_size 0 (66); so does kvbench."""
    forwards = with_tokens(synthetic_forwards(0, group=2, prompt=10, steps=5), 0, "mixed")
    for n_init, sep_cache_size, local_size, budget in [(4, 6, 8, 18), (4, 6, 8, 12), (0, 1, 1, 2)]:
        with pytest.raises((KvbenchError, ValueError), match="must exceed"):
            run_cache(press(n_init, sep_cache_size, local_size), budget, forwards)
    with pytest.raises((KvbenchError, ValueError), match="local_size"):
        run_cache(press(2, 3, 0), 12, forwards)


def test_no_separator_cache():
    """Found difference: ``sep_cache_size`` 0. The source refuses it (utils.py 75) and its manager fails at the
    first compression whose past window holds a separator (line 303's slice ``[sep_len, sep_len)``, 163); kvbench
    takes it and keeps no separator: the source's rule with no separators (initial, uncompressed, local)."""
    forwards = with_tokens(synthetic_forwards(0, group=2, prompt=10, steps=60), 0, "mixed")
    with pytest.raises(AssertionError):
        reference(forwards, 12, 2, 0, 6, SEPARATORS)
    kvbench = run_cache(press(2, 0, 6), 12, forwards)
    assert_identical(kvbench, reference(forwards, 12, 2, 0, 6, ()), forwards, min_compressions=10)


# --- the transcription against the source's own code (where the mirror is at hand) -------------------------


def source_manager():
    """The source's ``SepLLM_KVCache_Manager`` class, executed from the mirror at ``COMMIT`` (it imports torch only)."""
    text = subprocess.run(["git", "-C", str(MIRROR), "show", f"{COMMIT}:{MANAGER}"], capture_output=True, text=True,
                          check=True).stdout
    namespace = {}
    exec(compile(text, MANAGER, "exec"), namespace)  # the cited source, from its own commit
    return namespace["SepLLM_KVCache_Manager"]


@pytest.mark.skipif(not MIRROR.exists(), reason="needs the HKUDS/SepLLM mirror")
@pytest.mark.parametrize(("n_init", "sep_cache_size", "local_size", "budget", "rows", "rate"),
                         [(4, 3, 6, 14, 1, "mixed"), (0, 3, 6, 12, 1, "mixed"), (2, 8, 1, 12, 1, "dense"),
                          (4, 16, 6, 30, 1, "sparse"), (2, 3, 2, 10, 1, "all"), (3, 4, 4, 16, 1, "none"),
                          (4, 3, 6, 14, 2, "mixed"), (1, 4, 3, 12, 3, "sparse")])
def test_transcription(n_init, sep_cache_size, local_size, budget, rows, rate):
    """``SepLLMCache`` holds what the source's manager holds after every token (batches too), run on K/V tensors
    that carry their positions, as the evaluation script drives it."""
    cls = source_manager()
    with redirect_stdout(StringIO()):
        assert cls(model_type="llama").separator_token_ids == list(LLAMA_SEPARATORS)
        manager = cls(init_cache_size=n_init, sep_cache_size=sep_cache_size, local_size=local_size,
                      cache_size=budget, separator_token_ids=list(SEPARATORS))
    mine = SepLLMCache(n_init, sep_cache_size, local_size, budget, SEPARATORS, rows=rows)
    streams = [with_tokens(synthetic_forwards(0, prompt=1, steps=119), row, rate) for row in range(rows)]
    past = None
    for p in range(120):
        tokens = [int(stream[p].tokens) for stream in streams]
        k = torch.full((rows, 2, 1, 3), float(p))
        new = [[k, k.clone()] for _ in range(2)]  # two layers, two heads
        past = new if past is None else [[torch.cat([a, b], 2) for a, b in zip(layer, add)]
                                         for layer, add in zip(past, new)]
        manager.update_past_tok_ids(torch.tensor(tokens)[:, None])
        past = manager(past, SEP_ACCUMULATION=True, USE_MAX_SEP_CACHE=True)
        mine.forward([[p]] * rows, [[t] for t in tokens])
        for layer in past:
            for tensor in layer:
                assert torch.equal(tensor, tensor[:, :1, :, :1].expand_as(tensor))
        held = past[0][0][:, 0, :, 0].long().tolist()
        assert held == [mine.positions(row) for row in range(rows)], p
        assert manager.sep_exrange == mine.sep_exrange
        assert manager.past_tok_ids.tolist() == [[t for _, t in e] for e in mine.entries]
