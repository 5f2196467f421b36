"""quest against Quest's decoding-step attention: which cached keys each query head attends to.

Source: mit-han-lab/Quest @ 01c1623 (read with line numbers; transcribed without kvbench's press or its docs).

- ``evaluation/quest_attention.py`` lines 72-240 (``forward``): a forward of more than one token, or a layer with
  ``layer_id < 2``, is the model's own dense attention (84-93). Otherwise (one query token) the new key is appended
  to the cache (127-137), keys repeated per query head (``repeat_kv``, 139); ``sign`` is +1 where the query is
  > 0 and -1 elsewhere (146); ``max_key = key * sign``, ``postive_query = query * sign`` (147-148); ``max_key`` is
  padded along the sequence to a multiple of ``chunk_size`` with ``finfo.min`` (150-163), maxed per chunk
  (165-172: the page's upper bound of ``|q_i| * k_i``, i.e. max for q_i > 0, min for q_i <= 0) and broadcast
  back to each token of the chunk (174-179); a token's estimate is ``postive_query.float() @ bound`` (181-184),
  plus the attention mask if any (192-204); ``token_budget = min(kv_seq_len, self.token_budget)`` (206); if
  positive, ``local_heavy_hitter_mask`` (210-213), else nothing (215); ``tril`` at the query's position (217: a
  no-op for the single newest query); unselected keys get ``finfo.min`` before the softmax (218).
- lines 23-69 (``local_heavy_hitter_mask``): the estimates padded with ``finfo.min`` to a multiple of
  ``chunk_size`` (27-44), maxed per chunk (46-53: each chunk's common estimate), ``topk`` of
  ``min(max(3, token_budget // chunk_size), n_chunks)`` chunks (55-57), each expanded to its ``chunk_size`` token
  indices and scattered into a mask (58-64), the padding cut off (66-67). Chunks are over the cache's index, here
  the token position (batch 1, nothing evicted).
- lines 243-266 (``enable_quest_attention_eval``): a global ``layer_id = 32`` decremented at each attention
  module met in a walk over ``reversed(model._modules.items())``, so the last layer gets 31 and layer ``i`` of an
  ``N``-layer model gets ``i + 32 - N``; ``token_budget`` and ``chunk_size`` come from ``args`` (265-266).
  Quest's dense layers (``layer_id < 2``) are thus layers ``i < N - 30``: layers 0 and 1 on a 32-layer model,
  none at all on a model of 30 layers or fewer (the tiny model here: 3 layers, ids 29-31, checked by running the
  walk, ``test_layer_numbering``), ``N - 30`` layers above 32 (10 on 40 layers); a second call goes on from the
  global's last value. kvbench's ``dense_layers=L`` is the 32-layer reading (layers ``< L``; default 2).

``reference`` is that rule in plain torch for one sequence (Quest evaluates batch 1; a batch row is taken alone,
its valid slots ordered by position). kvbench's ``quest`` (``chunk_size=C``, ``dense_layers=L``, ``--budget B``)
is claimed as ``token_budget=B``, ``chunk_size=C``, layers ``< L`` dense. Found, comparing ``QuestPress.select``:

- seeded (``test_seeded``: C 4 and 16, groups 1, 2, 7, S 5/23/37/64/100, budgets 4/16/24/48/200, batch 2 with
  the second row left-padded to 3/4 of its slots): 1,300 query-head selections (batch rows x query heads), all
  identical to the reference with difference 2 removed; to the pure reference 1,157, the other 143 (117 at C 4,
  26 at C 16) exactly the rows where difference 2 applies, each missing one page
  (``test_every_page_at_full_budget``). Quest's minimum of 3 pages (line 56: 48 tokens at C 16, B 32) is kvbench's too.
- in situ (``test_in_situ``: tiny llama, 44-token prompt, 40 new tokens, groups 1, 2, 7, C/B 4/16, 16/32, 16/64,
  L 1; every ``select`` call recorded, its keys checked equal to the traced cache, the reference fed the traced
  post-RoPE keys and queries): 3,042 selections (39 steps x 2 selecting layers x 2, 4 or 7 query heads, for each
  C/B), all identical (difference 2 removed). The pure reference is identical at C/B 4/16 and 16/32 and at 16/64
  first differs (group 2) at step 5, layer 1, S 49 (49 % 16 != 0, 49 // 16 = 3: difference 2), after 32 identical ones.
  Dense layers return ``None`` (``test_dense_layers``). At a budget above every length the generated tokens equal
  the full cache's (``test_large_budget_is_full``). No disagreement other than the named ones.
- negative control (``test_control``): pages scored by the query against their mean key fail.

Named differences, each asserted exactly and, removed by a reference option, the only one:

1. Exact ties between two pages' bounds (``test_exact_ties``): kvbench ranks equal page estimates newest page
   first; Quest keeps what ``topk`` returns (line 55), on CPU not always the newer. Shown with a page copying an
   earlier page's keys (equal bounds exactly; 40 seeds, C/S/B 4/40/12 and 16/128/48): 27 of 640 selections
   differ, each by exactly the tied pair (kvbench the copy, Quest the original; first: seed 3, C 4, row 1, query
   head 3); ``ties="newest"`` gives kvbench's choice in all 640. Continuous keys had no ties (``test_seeded``
   and ``test_in_situ`` pass with ``topk``'s order).
2. Budget at least the tokens held (``test_every_page_at_full_budget``): line 206 caps ``token_budget`` at
   ``kv_seq_len`` but line 56 still takes ``token_budget // chunk_size`` chunks, so when ``S % C != 0`` and
   ``S // C >= 3`` Quest drops the lowest-estimate page even though the budget covers every token; kvbench
   attends to every page (``all_pages=True``). So Quest at a large budget is not the full cache; kvbench is.
3. Bounds in float32 (``test_float32_bounds``): Quest computes ``max_key`` and its product in the model's dtype
   (lines 147-184; the ``.float()`` of 182 is the query only). ``max``/``sign`` are exact in any dtype; only the
   product rounds (and line 182's float query times a half-precision bound would need autocast to run at all).
   On float32 models (the tiny model, the seeded cases) it cannot show; on bf16-valued inputs the float32
   reference is kvbench's in all 144 selections, a bf16-estimate reference (``dtype=torch.bfloat16``) differs in
   2 of them (rounding ties or reorders two pages' estimates).
"""

from unittest import mock

import pytest
import torch

from kvbench.presses import make_press
from tests.reference.harness import GROUPS, Agreement, log, tiny_model, trace_model

PROMPT = "Tom has 12 apples. He buys 7 more. How many?"
QuestPress = type(make_press("quest"))


def local_heavy_hitter_mask(attn_weights, token_budget, chunk_size, ties="topk"):
    """Lines 23-69 on [B, heads, q, S]. ``ties="newest"`` (not the source) ranks equal chunks newest first."""
    seq_length = attn_weights.shape[-1]
    padding_length = chunk_size - ((seq_length - 1) % chunk_size + 1)
    pad = torch.ones(*attn_weights.shape[:3], padding_length) * torch.tensor(torch.finfo(attn_weights.dtype).min)
    attn_weights = torch.cat([attn_weights, pad], dim=-1)
    chunk_attn_weights = attn_weights.reshape(*attn_weights.shape[:3], attn_weights.shape[3] // chunk_size,
                                              chunk_size).amax(dim=-1)
    k = min(max(3, token_budget // chunk_size), chunk_attn_weights.size(-1))
    if ties == "topk":
        _, topk = chunk_attn_weights.topk(k=k, dim=-1)
    else:
        newest_first = chunk_attn_weights.flip(-1).argsort(dim=-1, descending=True, stable=True)[..., :k]
        topk = chunk_attn_weights.size(-1) - 1 - newest_first
    topk = topk.unsqueeze(-1).repeat(1, 1, 1, 1, chunk_size) * chunk_size + torch.arange(chunk_size)
    topk = topk.reshape(topk.shape[0], topk.shape[1], topk.shape[2], -1)
    mask_bottom = torch.zeros_like(attn_weights, dtype=torch.bool)
    mask_bottom.scatter_(-1, topk, True)
    return mask_bottom[:, :, :, :seq_length]


def reference(query, keys, token_budget, chunk_size, *, ties="topk", all_pages=False, dtype=torch.float32,
              bounds="minmax"):
    """``forward``'s selection (lines 139-217) for one sequence's decoding query: query [Hq, D], keys [H, S, D]
    (index = position) -> [Hq, S] bool. Not the source: ``ties`` (difference 1), ``all_pages`` (difference 2),
    ``dtype`` of the bounds' product (difference 3); ``bounds="mean"`` only shows the comparison can fail."""
    hq, (h, seq_length, d) = query.shape[0], keys.shape
    key_states = keys.repeat_interleave(hq // h, dim=0)[None].to(dtype)  # repeat_kv, line 139
    query_states = query[None, :, None, :].to(dtype)
    sign = (query_states > 0) + (~(query_states > 0)) * -1  # line 146
    max_key = key_states * sign
    postive_query = query_states * sign
    padding_length = chunk_size - ((seq_length - 1) % chunk_size + 1)  # lines 151-163
    pad = torch.ones(1, hq, padding_length, d, dtype=dtype) * torch.tensor(torch.finfo(dtype).min)
    max_key = torch.cat([max_key, pad], dim=-2)
    chunks = max_key.reshape(1, hq, max_key.shape[2] // chunk_size, chunk_size, d)
    if bounds == "mean":  # not the source: the query against each page's mean key
        real = torch.cat([key_states, torch.zeros(1, hq, padding_length, d, dtype=dtype)], dim=-2)
        counts = torch.arange(max_key.shape[2]).lt(seq_length).reshape(-1, chunk_size).sum(-1)[:, None]
        chunk_max_key = real.reshape(chunks.shape).sum(-2) / counts
        postive_query = query_states
    else:
        chunk_max_key = chunks.amax(dim=-2)  # lines 165-172
    chunk_max_key = chunk_max_key.unsqueeze(-2).repeat(1, 1, 1, chunk_size, 1)  # lines 174-179
    chunk_max_key = chunk_max_key.reshape(1, hq, -1, d)[:, :, :seq_length, :]
    quantized_weight = torch.matmul(postive_query, chunk_max_key.transpose(2, 3)).float()  # lines 181-184
    token_budget = min(seq_length, token_budget)  # line 206
    if all_pages and token_budget == seq_length:  # not the source: every page at a budget covering them all
        return torch.ones(hq, seq_length, dtype=torch.bool)
    if token_budget > 0:
        mask_bottom = local_heavy_hitter_mask(quantized_weight, token_budget, chunk_size, ties)
    else:
        mask_bottom = torch.zeros_like(quantized_weight, dtype=torch.bool)
    return torch.tril(mask_bottom, diagonal=seq_length - 1)[0, :, 0]  # line 217, the query at position S - 1


def press(chunk_size, dense_layers=0):
    return make_press("quest", {"chunk_size": str(chunk_size), "dense_layers": str(dense_layers)})


def batch(seed, group, seq_len, d=8, pad_frac=0.25, dtype=torch.float32):
    """Batch 2: row 0 holds ``seq_len`` tokens, row 1 is left-padded to 3/4 of them; kv heads 2 (1 for group 7)."""
    g = torch.Generator().manual_seed(seed)
    h = 1 if group == 7 else 2
    keys = torch.randn(2, h, seq_len, d, generator=g) * (0.5 + torch.rand(2, h, seq_len, 1, generator=g))
    queries = torch.randn(2, h, group, d, generator=g) * 2.0
    pad = int(seq_len * pad_frac)
    valid = torch.ones(2, h, seq_len, dtype=torch.bool)
    valid[1, :, :pad] = False
    positions = torch.arange(seq_len).expand(2, h, seq_len).clone()
    positions[1] = (positions[1] - pad).clamp(min=0)
    return queries.to(dtype).float(), keys.to(dtype).float(), positions, valid


def row_reference(queries, keys, positions, valid, budget, chunk_size, b, **options):
    """The reference for batch row ``b``, its valid slots in position order, scattered back: [Hq, S]."""
    slots = valid[b, 0].nonzero()[:, 0]
    slots = slots[positions[b, 0, slots].argsort()]
    assert torch.equal(positions[b, 0, slots], torch.arange(slots.numel()))
    chosen = reference(queries[b].flatten(0, 1), keys[b][:, slots], budget, chunk_size, **options)
    out = torch.zeros(chosen.shape[0], keys.shape[2], dtype=torch.bool)
    out[:, slots] = chosen
    return out


def compare_select(case, chunk_size, budget, **options):
    """kvbench's ``select`` against the reference on one batch: (identical, total, differing (row, head)s)."""
    queries, keys, positions, valid = case
    mine = press(chunk_size).select(queries, keys, positions, valid, budget, 0)
    assert mine is not None and mine.shape == (*queries.shape[:3], keys.shape[2])
    assert not (mine & ~valid[:, :, None]).any()  # never an invalid slot
    differing = []
    for b in range(keys.shape[0]):
        theirs = row_reference(queries, keys, positions, valid, budget, chunk_size, b, **options)
        differing += [(b, q) for q, same in enumerate((mine[b].flatten(0, 1) == theirs).all(-1)) if not same]
    total = keys.shape[0] * queries.shape[1] * queries.shape[2]
    return total - len(differing), total, differing


def difference_two(n, budget, chunk_size):
    """Where line 56 takes fewer chunks than exist although the budget covers every token."""
    return budget >= n and n % chunk_size != 0 and n // chunk_size >= 3


SIZES, BUDGETS = (5, 23, 37, 64, 100), (4, 16, 24, 48, 200)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("chunk_size", [4, 16])
def test_seeded(group, chunk_size):
    identical = total = 0
    for seq_len in SIZES:
        for budget in BUDGETS:
            case = batch(seq_len * 7 + budget, group, seq_len)
            same, n, differing = compare_select(case, chunk_size, budget, all_pages=True)
            assert not differing, (seq_len, budget, differing)
            identical, total = identical + same, total + n
    log("quest", f"seeded group {group} chunk {chunk_size}", Agreement(len(SIZES) * len(BUDGETS), total, identical,
                                                                       None))
    assert identical == total == len(SIZES) * len(BUDGETS) * 2 * group * (1 if group == 7 else 2)


@pytest.mark.parametrize("chunk_size", [4, 16])
def test_every_page_at_full_budget(chunk_size):
    """Difference 2: at ``budget >= S`` with ``S % C != 0`` and ``S // C >= 3`` Quest takes ``S // C`` of the
    ``ceil(S / C)`` pages (lines 56, 206), dropping every query head's lowest-estimate page; kvbench takes all."""
    shown = total = 0
    for group in GROUPS:
        for seq_len in SIZES:
            for budget in BUDGETS:
                case = batch(seq_len * 7 + budget, group, seq_len)
                _, n, differing = compare_select(case, chunk_size, budget)
                total += n
                lengths = [int(case[3][b, 0].sum()) for b in range(2)]
                expected = [(b, q) for b in range(2) if difference_two(lengths[b], budget, chunk_size)
                            for q in range(case[0].shape[1] * group)]
                assert differing == expected, (group, seq_len, budget)
                for b, q in differing:
                    theirs = row_reference(*case, budget, chunk_size, b)[q]
                    missing = (case[3][b, 0] & ~theirs).nonzero()[:, 0]
                    pages = case[2][b, 0, missing] // chunk_size
                    assert pages.unique().numel() == 1 and missing.numel() in (chunk_size, lengths[b] % chunk_size)
                shown += len(differing)
    log("quest", f"seeded chunk {chunk_size}, pure reference", Agreement(total, total, total - shown, None))
    assert shown > 0


@pytest.mark.parametrize("chunk_size", [4, 16])
def test_control(chunk_size):
    """Pages scored by the query against their mean key (not min/max bounds) do not pass the comparison."""
    differing = 0
    for seq_len in (37, 64, 100):
        differing += len(compare_select(batch(seq_len, 2, seq_len), chunk_size, 16, all_pages=True,
                                        bounds="mean")[2])
    assert differing > 0


def tied_batch(seed, chunk_size, seq_len, copies):
    """Random keys where page ``j`` copies page ``i``'s keys for each (i, j) in ``copies``: equal bounds."""
    queries, keys, positions, valid = batch(seed, 2, seq_len, pad_frac=0.0)
    for i, j in copies:
        keys[:, :, j * chunk_size:(j + 1) * chunk_size] = keys[:, :, i * chunk_size:(i + 1) * chunk_size]
    return queries, keys, positions, valid


def test_exact_ties():
    """Difference 1: with a page copying another's keys (equal estimates exactly) kvbench keeps the newer page at
    the cut; Quest what ``topk`` returns (line 55), sometimes the older. Ranking ties newest first, identical."""
    shown = 0
    for seed in range(40):
        for chunk_size, seq_len, budget in ((4, 40, 12), (16, 128, 48)):
            case = tied_batch(seed, chunk_size, seq_len, [(seed % 5, 5 + seed % 3)])
            positions = case[2]
            assert not compare_select(case, chunk_size, budget, ties="newest")[2]
            for b, q in compare_select(case, chunk_size, budget)[2]:
                mine = row_reference(*case, budget, chunk_size, b, ties="newest")[q]
                theirs = row_reference(*case, budget, chunk_size, b)[q]
                only_mine = (positions[b, 0][mine & ~theirs] // chunk_size).unique()
                only_theirs = (positions[b, 0][theirs & ~mine] // chunk_size).unique()
                assert only_mine.tolist() == [5 + seed % 3] and only_theirs.tolist() == [seed % 5]
                shown += 1
    assert shown > 0


def test_float32_bounds():
    """Difference 3: on bf16-valued keys and queries kvbench's selections are the float32 reference's; the
    estimates rounded to bf16 (Quest on a bf16 model, lines 147-184) choose other pages in some selections."""
    rounded = total = 0
    for chunk_size in (4, 16):
        for seq_len in (37, 64, 100):
            for budget in (16, 24, 48):
                case = batch(seq_len + budget, 2, seq_len, dtype=torch.bfloat16)
                assert not compare_select(case, chunk_size, budget, all_pages=True)[2]
                _, n, differing = compare_select(case, chunk_size, budget, all_pages=True, dtype=torch.bfloat16)
                rounded, total = rounded + len(differing), total + n
    assert 0 < rounded < total


def test_dense_layers():
    """Layers below ``dense_layers`` attend to every valid slot (``select`` returns None), the others select."""
    queries, keys, positions, valid = batch(0, 2, 64)
    for dense in (0, 1, 2, 5):
        chosen = [press(16, dense).select(queries, keys, positions, valid, 16, i) for i in range(6)]
        assert [c is None for c in chosen] == [i < dense for i in range(6)]
    assert make_press("quest").dense_layers == 2 and make_press("quest").chunk_size == 16


def quest_layer_ids(model):
    """``enable_quest_attention_eval``'s walk (lines 243-264), recording ``layer_id`` instead of patching."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    ids, counter = {}, [32]

    def walk(module):
        for _name, child in reversed(module._modules.items()):
            if len(list(child.children())) > 0:
                walk(child)
            if isinstance(child, LlamaAttention):
                counter[0] -= 1
                ids[child.layer_idx] = counter[0]

    walk(model)
    return [ids[i] for i in sorted(ids)]


def test_layer_numbering():
    """Layer ``i`` of ``N`` gets ``i + 32 - N``: none of the tiny model's 3 layers is dense (``layer_id < 2``)."""
    model, _ = tiny_model(2)
    assert quest_layer_ids(model) == [29, 30, 31]


def record_selections(model, prompt, chunk_size, budget, dense, new_tokens):
    """trace_model under kvbench's quest, with every ``select`` call's inputs and output."""
    calls, select = [], QuestPress.select

    def recording(self, queries, keys, positions, valid, budget_, layer_idx):
        out = select(self, queries, keys, positions, valid, budget_, layer_idx)
        calls.append((layer_idx, keys.clone(), positions.clone(), valid.clone(), out))
        return out

    with mock.patch.object(QuestPress, "select", recording):
        forwards, _ = trace_model(model, prompt, press(chunk_size, dense), budget, max_new_tokens=new_tokens)
    return forwards, calls


def in_situ_agreement(forwards, calls, chunk_size, budget, dense, **options):
    """(identical, compared, first differing (step, layer, S)) over every recorded decoding selection."""
    layers = forwards[0].layers
    keys = torch.cat([f.keys for f in forwards], dim=2)
    assert len(calls) == (len(forwards) - 1) * layers
    identical = compared = 0
    for i, (layer, seen, positions, valid, out) in enumerate(calls):
        step = i // layers + 1
        n = int(forwards[step].positions[-1]) + 1
        assert valid.all() and torch.equal(positions[0, 0], torch.arange(n))
        assert torch.equal(seen[0], keys[layer, :, :n])  # select sees the traced cache, in position order
        if layer < dense:
            assert out is None
            continue
        theirs = reference(forwards[step].queries[layer][:, 0], keys[layer, :, :n], budget, chunk_size, **options)
        same = (out[0].flatten(0, 1) == theirs).all(-1)
        identical, compared = identical + int(same.sum()), compared + same.numel()
        if not same.all():
            return identical, compared, (step, layer, n)
    return identical, compared, None


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize(("chunk_size", "budget"), [(4, 16), (16, 32), (16, 64)])
def test_in_situ(group, chunk_size, budget):
    model, tokenizer = tiny_model(group)
    prompt = tokenizer(PROMPT)["input_ids"]
    forwards, calls = record_selections(model, prompt, chunk_size, budget, 1, 40)
    identical, compared, first = in_situ_agreement(forwards, calls, chunk_size, budget, 1, all_pages=True)
    log("quest", f"tiny-llama group {group} chunk {chunk_size} budget {budget}",
        Agreement(len(forwards), compared, identical, None if first is None else str(first)))
    assert first is None and identical == (len(forwards) - 1) * 2 * model.config.num_attention_heads
    _, _, first = in_situ_agreement(forwards, calls, chunk_size, budget, 1)
    sizes = [int(f.positions[-1]) + 1 for f in forwards[1:]]
    expected = next((n for n in sizes if difference_two(n, budget, chunk_size)), None)
    assert (first and first[2]) == expected  # the pure reference differs only by difference 2, from its first step


def test_large_budget_is_full():
    """At a budget above every length (every page, difference 2) kvbench's tokens are the full cache's."""
    from kvbench.engine.generate import GenerationSettings, generate

    model, tokenizer = tiny_model(2)
    prompt = tokenizer(PROMPT)["input_ids"]
    settings = GenerationSettings(max_new_tokens=40)
    full = generate(model, [prompt], make_press("full"), 1000, settings)[0].tokens
    for chunk_size in (4, 16):
        assert generate(model, [prompt], press(chunk_size), 1000, settings)[0].tokens == full
