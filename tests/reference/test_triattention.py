"""triattention against TriAttention's attention-layer compressor in the paper's configuration, run by its own cache.

Source: WeianMao/triattention @ c3744ee6 (read with line numbers; transcribed without kvbench's press or its docs).

- ``scripts/cli.py`` 298-313, ``scripts/worker.py`` 615-634: TriAttention's experiment scripts call
  ``apply_triattention_patch`` with
  ``per_head_pruning=True``, ``count_prompt_tokens=True``, ``slack_budget_trigger=True``, ``normalize_scores=True``,
  ``divide_length=128``, ``offset_max_length=65536``, ``score_aggregation="mean"``, ``pruning_seed=0``,
  ``allow_prefill_compression=False``.
- ``triattention/methods/triattention.py``, ``triattention_forward`` (764-1040), after every forward: at the prefill
  (empty cache, 784-796, 873-877) the state is reset (669-684: the noise generator re-seeded with ``pruning_seed``),
  ``cache_positions = range(P)``, ``absolute_position = prefix_length = P``; nothing is compressed (902). At a
  decoding forward the new positions are appended to ``cache_positions`` and to every head's
  ``cache_positions_per_head`` (878-892); with the slack trigger the cache is compressed once it holds
  ``>= budget + divide_length`` entries (count_prompt_tokens: the prompt counts, 895-902). The per-head keep indices
  gather every layer's keys and values with the same ``[kv_heads, kept]`` indices (963-983), and each head's
  positions follow (985-1000). A 1-D result (the prompt-only paths below) gathers every head alike and updates
  ``cache_positions`` only (1001-1013).
- ``compute_keep_indices`` (168-289): ``decode_start = prefix_length`` (the prompt is pinned); a cache of only
  prompt entries keeps its first ``budget`` (209-211); ``decode_budget = budget - P``, and when that is 0 the
  cache's first ``min(budget, P)`` entries are kept -- the prompt's first ``budget`` tokens, every decoded entry
  dropped (214-217). Otherwise every layer's sampled heads score the decoded entries (239-256,
  ``_compute_layer_head_scores`` 566-667: each query head reads its KV head ``h // group``, 621-623, at that KV
  head's own positions, 599-635), each row is z-normalised over them (259-262, population std clamped at 1e-6),
  ``rand * 1e-6`` from the seeded generator is added (265-271), and ``_select_per_head_independent`` (368-450)
  takes, per KV head, the max over each layer's group of query heads, the mean over layers (397-429), and
  ``topk(budget - P)`` (431-437): the kept decoded entries are gathered in ``topk``'s order after the prompt.
- ``triattention/methods/pruning_utils.py``: ``invert_rope`` (51-83, half style), ``to_complex_pairs`` (86-98),
  ``compute_frequency_statistics_from_means`` (256-274), ``score_keys_for_round`` (277-309; ``round_start`` is
  ``absolute_position``, the next token's position), ``build_geometric_offsets`` (245-253: 1, 2, 4, ... <= M),
  ``compute_frequency_scaling`` (212-224: ``cos0[0::2]``, ``sin0[0::2]`` at position 0), ``omega = inv_freq[:d/2]``
  and ``attention_scale`` (triattention.py 117-125), ``load_head_frequency_stats`` (336-359; heads filtered to the
  model's layers, triattention.py 103-113). Scoring is float32 (``dtype = torch.float32``, triattention.py 715;
  keys cast, 627). ``scripts/calibrate.py`` 209-271: the file's layout, ``sampled_heads`` every head in layer order.

``reference`` is that rule in plain torch over the source's own cache: each layer's keys in its physical order
(prompt, then the kept decoded entries in ``topk`` order, new tokens appended), one position list per KV head
shared by the layers, ``absolute_position``, ``prefix_length`` and the seeded generator.

Claim: kvbench's ``triattention`` (``stats``, ``buffer`` N, ``offset_max_length`` M) at ``--budget B`` is that
configuration with ``kv_budget=B``, ``divide_length=N``, ``offset_max_length=M``. Found, without the noise:
identical kept sets at every forward -- seeded (groups 1, 2, 7; B/N/P/M/d 16/4/6/65536/8, 24/8/10/64/8,
40/6/20/65536/16, 12/4/11 (one decoded entry kept), 12/4/12 (P = B), 10/4/12 and 8/4/11 (B < P < B + N), 12/1/6;
``aggregation=max``, ``normalize=false``, M=100) and in situ (tiny llama, a 55-token prompt calibrated by kvbench's
``query_statistics``, groups 1, 2, 7, B/N 64/8, 56/6, 50/8; YaRN, attention scaling 1.139). ``test_control``: a
``round_start`` one off either way, no normalisation, max in place of mean over offsets, M 64 for 65536, all fail.
For P >= B the source's rule is not a score at all (214-217): it keeps the prompt's first B tokens and drops every
decoded entry at each compression; kvbench does the same (``test_prompt_over_budget``).

Named differences, each asserted exactly and, put into the reference, the only one:

1. Noise (``test_noise``, ``test_exact_ties``): the source adds ``rand * 1e-6`` (generator seeded 0 at the
   prefill, one draw per compression, 265-271) to the z-scores; kvbench adds none and ranks exact ties newest
   first. On continuous scores the noise changed no compression: seeds 0-9 x 3 cases x 3 groups, 690 of 690
   compressions identical with the noise on (the sweep asserts any difference would be a near-tie); in situ 69 of
   69 (``test_in_situ``; 45 of them scored, the 24 at B/N 50/8 draw no noise); a wider sweep run once outside the
   suite (seeds 0-99 at 16/4/6, 24/8/10/M 64 and 40/6/20/d 16, seeds 0-19 at 128/16/40/d 16 over 200 steps; groups
   1, 2, 7): 7,320 of 7,320, with and without the noise. With exact
   ties (a statistics file of zeros: every z-score 0) kvbench keeps the newest B - P decoded entries, the source
   without noise CPU ``topk``'s pick, with it a random one; with ties ranked newest first, identical.
2. Prefill cut (``test_prefill_cut``, ``test_in_situ`` at B/N 40/8): for P >= B + N (not only P > B + N: at P =
   B + N too) kvbench cuts the prompt to its first B entries at the prefill; the source holds it whole and compresses
   at the first decoding forward, where ``decode_budget`` is 0 (214-217) so it keeps the same first B entries but
   also drops that forward's new token. Its compressions then fall at forwards 1 + kN, kvbench's at kN: both hold the
   prompt's first B and a recent window, the source's ``(t - 1) mod N`` entries, kvbench's ``t mod N``, so for N >= 2
   the kept sets differ at every forward. With the cut at the prefill (``prefill_cut``), identical.
3. RoPE scale per frequency (``test_rope_scale``): the source's scale is ``cos0[0::2]`` (224): in HF's half layout
   the even *indices* (frequencies 0, 2, 4, ... twice), not each frequency; kvbench reads frequency f's own. The
   same under every HF RoPE (the scale at position 0 is ``attention_scaling`` for every frequency: standard, YaRN
   in situ); a made-up RoPE with a scale per frequency differs at the first compression and is identical with
   ``freq="per_frequency"``. A uniform scale (the source's ``attention_scale`` or not) does not change the ranking.
4. float32 (``test_bfloat16``): not a difference. The source scores in float32 from keys cast to it (627, 715); on
   bfloat16 keys kvbench is identical to that.

Also found (``test_stats_order``): the source indexes its score rows by the position of a head in the file's
``sampled_heads`` list (399-404) but stacks them layer by layer in the model's order (241-247, 591): a file whose
list is not grouped by layer pairs KV heads with other heads' scores. kvbench reads heads by name: with a shuffled
list it equals the source on the same file listed in order, and differs from the source on the shuffled one.
calibrate.py writes the list in order, so the paper's files are not affected. A file that does not hold every
(layer, query head) -- the source falls back (427-429, 592-593) -- is refused by kvbench (``PressError``).
"""

import dataclasses

import pytest
import torch

from kvbench.engine.rope import StandardRope
from kvbench.models import build_tiny
from kvbench.presses import PressError, make_press
from kvbench.runs.calibrate import query_statistics
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

NAME = "triattention"
PROMPT = "Tom has 12 apples. He buys 7 more and eats 3. How many?"
CALIBRATION = "The quick brown fox jumps over the lazy dog, then counts 1 2 3 4 5 6 7 8 9 10 and stops."


@dataclasses.dataclass(frozen=True)
class Config:
    """The paper's configuration. ``noise`` is the source (``pruning_seed`` 0); ``ties``, ``prefill_cut`` and
    ``freq`` name kvbench's differences 1-3; ``shift`` (``round_start`` moved) only shows the comparison can fail."""

    budget: int
    divide_length: int
    offset_max_length: int = 65536
    aggregation: str = "mean"
    normalize: bool = True
    noise: bool = False
    seed: int = 0
    ties: str = "topk"  # "newest": equal scores ranked newest first (kvbench)
    prefill_cut: bool = False  # a prompt of >= budget + divide_length compressed at the prefill (kvbench)
    freq: str = "source"  # "per_frequency": each frequency's own scale at position 0 (kvbench)
    shift: int = 0


@dataclasses.dataclass(frozen=True)
class Rotary:
    """The source's ``self.rotary``: positions [n] -> cos, sin [n, d], its ``inv_freq`` and ``attention_scaling``."""

    rope: object
    inv_freq: torch.Tensor
    attention_scaling: float = 1.0

    def __call__(self, positions):
        cos, sin = self.rope(positions)
        return cos.float(), sin.float()


def model_rotary(model):
    rotary = model.model.rotary_emb
    return Rotary(lambda p: tuple(x[0] for x in rotary(torch.zeros(1), p[None])), rotary.inv_freq.float(),
                  float(rotary.attention_scaling))


def rotate_half(x):
    """pruning_utils.py 39-48, half style."""
    d = x.shape[-1] // 2
    return torch.cat((-x[..., d:], x[..., :d]), dim=-1)


def invert_rope(rotated, cos, sin, scale):
    """pruning_utils.py 51-83, half style."""
    scale_t = torch.tensor(scale, dtype=rotated.dtype)
    base = rotated / scale_t
    return base * (cos / scale_t) - rotate_half(base) * (sin / scale_t)


def frequency_statistics(q_mean, q_abs_mean, k_unrot):
    """``compute_frequency_statistics_from_means`` (256-274) with ``to_complex_pairs`` (86-98): amp, phi, extra."""
    f = k_unrot.shape[1] // 2
    k_complex = torch.complex(k_unrot[:, :f].contiguous(), k_unrot[:, f:].contiguous())
    q_mean_abs = torch.abs(q_mean)
    k_abs = torch.abs(k_complex)
    relative = q_mean.unsqueeze(0) * torch.conj(k_complex)
    phi = torch.atan2(relative.imag, relative.real)
    return q_mean_abs.unsqueeze(0) * k_abs, phi, (q_abs_mean - q_mean_abs).unsqueeze(0) * k_abs


def score_keys_for_round(key_indices, round_start, amp, phi, omega, extra, offsets, aggregation, freq_scale_sq):
    """pruning_utils.py 277-309 (``disable_trig`` off)."""
    base_delta = round_start - key_indices.to(dtype=torch.float32)
    delta_grid = base_delta.unsqueeze(1) + offsets.unsqueeze(0)
    phase = delta_grid.unsqueeze(2) * omega.view(1, 1, -1) + phi.unsqueeze(1)
    base_scores = (amp.unsqueeze(1) * freq_scale_sq.view(1, 1, -1) * torch.cos(phase)).sum(dim=2)
    additive = (extra * freq_scale_sq.view(1, -1)).sum(dim=1, keepdim=True)
    combined = base_scores + additive
    return combined.mean(dim=1) if aggregation == "mean" else combined.max(dim=1).values


def geometric_offsets(max_length):
    """``build_geometric_offsets`` (245-253)."""
    offsets, value = [], 1
    while value <= max_length:
        offsets.append(float(value))
        value *= 2
    return torch.tensor(offsets, dtype=torch.float32)


def frequency_scale(rotary, head_dim, freq="source"):
    """``compute_frequency_scaling`` (212-224): ``cos0[0::2]``; ``freq="per_frequency"``: frequency f's own."""
    cos, sin = rotary(torch.zeros(1, dtype=torch.long))
    pick = slice(0, None, 2) if freq == "source" else slice(0, head_dim // 2)
    return torch.sqrt(cos[0][pick].pow(2) + sin[0][pick].pow(2)).float()


def load_stats(payload, layer_count):
    """``load_head_frequency_stats`` (336-359) and the filter of triattention.py 103-113."""
    stats = {}
    for layer, head in payload["metadata"]["sampled_heads"]:
        entry = payload["stats"].get(f"layer{layer:02d}_head{head:02d}")
        if entry is not None:
            stats[(int(layer), int(head))] = (torch.complex(entry["q_mean_real"].float(), entry["q_mean_imag"].float()),
                                              entry["q_abs_mean"].float())
    sampled = [(int(la), int(h)) for la, h in payload["metadata"]["sampled_heads"] if 0 <= la < layer_count]
    return sampled, stats


@dataclasses.dataclass
class Source:
    """The compressor's state (triattention.py 137-166) and what it needs to score."""

    cfg: Config
    sampled: list
    stats: dict
    group: int
    rotary: Rotary
    omega: torch.Tensor
    offsets: torch.Tensor
    freq_scale_sq: torch.Tensor
    keys: list = None  # per layer [kv_heads, n, d], the source's physical order
    positions: list = None  # per KV head, the positions at each slot
    absolute: int = 0
    prefix: int = 0
    generator: torch.Generator = None
    trace: list = None

    def compress(self, t):
        keep = self.keep_indices(t)
        if keep is not None:
            self.keys = [torch.stack([k[h, keep[h]] for h in range(k.shape[0])]) for k in self.keys]
            self.positions = [[row[j] for j in keep[h].tolist()] for h, row in enumerate(self.positions)]

    def keep_indices(self, t):
        """``compute_keep_indices`` (168-289) with ``_select_per_head_independent`` (368-450): [kv_heads, kept]."""
        cfg, kv_heads = self.cfg, len(self.positions)
        kv_len = self.keys[0].shape[1]
        if kv_len <= cfg.budget:  # 202-203
            return None
        decode_start = min(self.prefix, kv_len)
        decode_count = kv_len - decode_start
        if decode_count == 0:  # 209-211
            return torch.arange(min(cfg.budget, kv_len)).expand(kv_heads, -1)
        decode_budget = max(0, cfg.budget - decode_start)
        if decode_budget == 0:  # 214-217
            return torch.arange(min(cfg.budget, decode_start)).expand(kv_heads, -1)
        rows = []
        for layer, keys in enumerate(self.keys):  # 239-247
            tables = {}
            for kv in range(kv_heads):  # 601-608
                pos = torch.tensor(self.positions[kv][decode_start:kv_len])
                tables[kv] = (pos, *self.rotary(pos))
            for la, head in [(la, h) for la, h in self.sampled if la == layer]:  # 591, 617-662
                q_mean, q_abs_mean = self.stats[(la, head)]
                kv = min(kv_heads - 1, head // max(1, self.group))
                pos, cos, sin = tables[kv]
                k_unrot = invert_rope(keys[kv, decode_start:kv_len], cos, sin, self.rotary.attention_scaling)
                amp, phi, extra = frequency_statistics(q_mean, q_abs_mean, k_unrot)
                rows.append(score_keys_for_round(pos, self.absolute + cfg.shift, amp, phi, self.omega, extra,
                                                 self.offsets, cfg.aggregation, self.freq_scale_sq))
        head_matrix = torch.stack(rows)
        if cfg.normalize:  # 259-262
            mean = head_matrix.mean(dim=1, keepdim=True)
            std = head_matrix.std(dim=1, unbiased=False, keepdim=True).clamp_min(1e-6)
            head_matrix = (head_matrix - mean) / std
        if self.generator is not None:  # 265-271
            head_matrix = head_matrix + torch.rand(head_matrix.shape, generator=self.generator) * 1e-6
        keep_count = min(decode_budget, decode_count)
        groups = {}  # 398-404: indices into the file's list of heads
        for i, (la, head) in enumerate(self.sampled):
            groups.setdefault((la, head // max(1, self.group)), []).append(i)
        layers = sorted({la for la, _ in self.sampled})
        kept = []
        for kv in range(kv_heads):  # 412-437
            maxes = [head_matrix[groups[(la, kv)]].max(dim=0).values for la in layers if (la, kv) in groups]
            aggregated = torch.stack(maxes).mean(dim=0) if maxes else head_matrix.mean(dim=0)
            if cfg.ties == "topk":
                chosen = aggregated.topk(keep_count, largest=True).indices
            else:  # newest first among equal scores
                newest = torch.tensor(self.positions[kv][decode_start:kv_len]).argsort(descending=True)
                chosen = newest[aggregated[newest].argsort(descending=True, stable=True)][:keep_count]
            if self.trace is not None:
                self.trace.append((t, kv, self.positions[kv][decode_start:kv_len], aggregated))
            kept.append(torch.cat([torch.arange(decode_start), chosen + decode_start]))  # 443-448
        return torch.stack(kept)


def reference(forwards, cfg, payload, rotary, trace=None):
    """kept[t][layer][head] of the source's cache under ``cfg`` with the statistics ``payload`` (the file's
    contents) and the model's ``rotary``; ``trace`` collects (forward, KV head, positions, aggregated scores)."""
    n_layers = forwards[0].layers
    sampled, stats = load_stats(payload, n_layers)
    head_dim = int(payload["metadata"].get("head_dim", rotary.inv_freq.numel() * 2))  # 120
    src = Source(cfg, sampled, stats, forwards[0].group, rotary, rotary.inv_freq.float()[: max(1, head_dim // 2)],
                 geometric_offsets(cfg.offset_max_length), frequency_scale(rotary, head_dim, cfg.freq).pow(2),
                 trace=trace)
    kept = []
    for t, forward in enumerate(forwards):
        new = forward.positions.tolist()
        if t == 0:  # 784-796, 873-877
            src.generator = torch.Generator().manual_seed(cfg.seed) if cfg.noise else None
            src.keys = [forward.keys[i].float() for i in range(n_layers)]
            src.positions = [list(new) for _ in range(forward.keys.shape[1])]
            src.absolute = src.prefix = len(new)
            if cfg.prefill_cut and len(new) >= cfg.budget + cfg.divide_length:  # kvbench (difference 2)
                src.compress(t)
        else:  # 878-892
            src.keys = [torch.cat([k, forward.keys[i].float()], dim=1) for i, k in enumerate(src.keys)]
            for row in src.positions:
                row.extend(range(src.absolute, src.absolute + len(new)))
            src.absolute += len(new)
            if src.keys[0].shape[1] >= cfg.budget + cfg.divide_length:  # 899-902
                src.compress(t)
        kept.append([[set(row) for row in src.positions] for _ in range(n_layers)])
    return kept


def write_stats(path, n_layers, query_heads, head_dim, seed=0, zero=False, heads=None):
    """Random statistics in the source's layout (calibrate.py 231-271): every (layer, head) unless ``heads``."""
    g = torch.Generator().manual_seed(seed)
    f, stats = head_dim // 2, {}
    for layer in range(n_layers):
        for head in range(query_heads):
            real, imag = torch.randn(f, generator=g), torch.randn(f, generator=g)
            abs_mean = torch.complex(real, imag).abs() + torch.rand(f, generator=g)
            if zero:
                real, imag, abs_mean = real * 0, imag * 0, abs_mean * 0
            stats[f"layer{layer:02d}_head{head:02d}"] = {"q_mean_real": real, "q_mean_imag": imag,
                                                         "q_abs_mean": abs_mean}
    heads = heads if heads is not None else [[la, h] for la in range(n_layers) for h in range(query_heads)]
    payload = {"metadata": {"num_traces": 1, "head_dim": head_dim, "rope_style": "half", "rope_type": "default",
                            "sampled_heads": heads}, "stats": stats}
    torch.save(payload, path)
    return payload


def rotated(forwards, rope):
    """Seeded forwards with keys and queries rotated at their positions (post-RoPE, as a model's)."""
    out = []
    for f in forwards:
        cos, sin = rope(f.positions)
        out.append(dataclasses.replace(f, keys=f.keys * cos + rotate_half(f.keys) * sin,
                                       queries=f.queries * cos + rotate_half(f.queries) * sin))
    return out


def press(stats, n, m=65536, **extra):
    return make_press(NAME, {"stats": str(stats), "buffer": str(n), "offset_max_length": str(m),
                             **{k: str(v) for k, v in extra.items()}})


def seeded(tmp_path, seed, group, budget, n, prompt, m=65536, head_dim=8, steps=60, heads=None, rope=None,
           zero_stats=False, **extra):
    """kvbench's kept sets on a seeded run, with the forwards, the statistics and the rotary for the reference."""
    rope = rope or StandardRope(head_dim)
    forwards = rotated(synthetic_forwards(seed, group=group, prompt=prompt, head_dim=head_dim, steps=steps), rope)
    path = tmp_path / f"stats-{seed}-{group}-{head_dim}.pt"
    payload = write_stats(path, 2, 2 * group, head_dim, seed, zero=zero_stats, heads=heads)
    kvbench = run_cache(press(path, n, m, **extra), budget, forwards, rope=rope)
    return kvbench, forwards, payload, Rotary(rope, rope.inv_freq)


def schedule(budget, n, prompt, steps=60):
    """Decoding forwards at which the source compresses (P < B + N): the cache reaches B + N, then every N."""
    first = budget + n - prompt
    return list(range(first, steps + 1, n)) if first <= steps else []


#: budget, divide_length, prompt, offset_max_length, head_dim: P < B (the main cases; 12/4/11 keeps one decoded
#: entry), P = B, B < P < B + N (10/4/12, 8/4/11), divide_length 1.
CASES = [(16, 4, 6, 65536, 8), (24, 8, 10, 64, 8), (40, 6, 20, 65536, 16), (12, 4, 11, 65536, 8),
         (12, 4, 12, 65536, 8), (10, 4, 12, 65536, 8), (8, 4, 11, 65536, 8), (12, 1, 6, 65536, 8)]


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize(("budget", "n", "prompt", "m", "head_dim"), CASES)
def test_seeded(tmp_path, group, budget, n, prompt, m, head_dim):
    kvbench, forwards, payload, rotary = seeded(tmp_path, group, group, budget, n, prompt, m, head_dim)
    theirs = reference(forwards, Config(budget, n, m), payload, rotary)
    agreement = assert_identical(kvbench, theirs, forwards, NAME,
                                 f"seeded group {group} B/N/P/M/d {budget}/{n}/{prompt}/{m}/{head_dim}")
    assert agreement.compressions == len(schedule(budget, n, prompt))


@pytest.mark.parametrize(("extra", "options"), [({"aggregation": "max"}, {"aggregation": "max"}),
                                                ({"normalize": "false"}, {"normalize": False}),
                                                ({}, {"offset_max_length": 100})])
def test_parameters(tmp_path, extra, options):
    """``aggregation``, ``normalize`` and ``offset_max_length`` (M 100: offsets 1 to 64) are the source's."""
    m = options.get("offset_max_length", 65536)
    for group in GROUPS:
        kvbench, forwards, payload, rotary = seeded(tmp_path, 3, group, 16, 4, 6, m, **extra)
        cfg = Config(16, 4, **{"offset_max_length": m, **options})
        assert_identical(kvbench, reference(forwards, cfg, payload, rotary), forwards, NAME,
                         f"seeded group {group} 16/4/6 {extra or options}", min_compressions=12)


@pytest.mark.parametrize("variant", [{"shift": 1}, {"shift": -1}, {"normalize": False}, {"aggregation": "max"},
                                     {"offset_max_length": 64}])
def test_control(tmp_path, variant):
    """``round_start`` one off either way, no z-normalisation, max over offsets, or fewer offsets: not kvbench."""
    for budget, n, prompt, head_dim in ((16, 4, 6, 8), (40, 6, 20, 16)):
        kvbench, forwards, payload, rotary = seeded(tmp_path, 1, 2, budget, n, prompt, head_dim=head_dim)
        theirs = reference(forwards, Config(budget, n, **variant), payload, rotary)
        assert compare(kvbench, theirs, forwards).first_difference


@pytest.mark.parametrize(("budget", "n", "prompt"), [(12, 4, 12), (10, 4, 12), (8, 4, 11)])
def test_prompt_over_budget(tmp_path, budget, n, prompt):
    """P >= B: ``decode_budget`` is 0 (214-217) and every compression keeps the prompt's first B tokens only, in
    every head; kvbench too (identical in ``test_seeded``)."""
    kvbench, forwards, payload, rotary = seeded(tmp_path, 4, 2, budget, n, prompt)
    theirs = reference(forwards, Config(budget, n), payload, rotary)
    assert kvbench == theirs
    for t in schedule(budget, n, prompt):
        assert all(heads == set(range(budget)) for layer in theirs[t] for heads in layer), t


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize(("budget", "n", "prompt"), [(8, 4, 12), (8, 4, 20), (16, 6, 30)])
def test_prefill_cut(tmp_path, group, budget, n, prompt):
    """Difference 2: P >= B + N. The source holds the prompt whole after the prefill and compresses at decoding
    forwards 1, 1 + N, ... (keeping the prompt's first B, the new token dropped); kvbench cuts at the prefill and
    compresses at N, 2N, ...; with the cut at the prefill, identical."""
    kvbench, forwards, payload, rotary = seeded(tmp_path, group, group, budget, n, prompt)
    theirs = reference(forwards, Config(budget, n), payload, rotary)
    log(NAME, f"seeded group {group} B/N/P {budget}/{n}/{prompt} (prefill cut)", compare(kvbench, theirs, forwards))
    first = set(range(budget))
    for t, (mine, source) in enumerate(zip(kvbench, theirs, strict=True)):
        for a, b in zip((h for layer in mine for h in layer), (h for layer in source for h in layer), strict=True):
            if t == 0:
                assert a == first and b == set(range(prompt))
            else:  # the prompt's first B and the tokens since the last compression (token of forward s: P + s - 1)
                assert a == first | {prompt + s - 1 for s in range(t - t % n + 1, t + 1)}, (t, a)
                assert b == first | {prompt + s - 1 for s in range(t - (t - 1) % n + 1, t + 1)}, (t, b)
                assert a != b
    assert_identical(kvbench, reference(forwards, Config(budget, n, prefill_cut=True), payload, rotary), forwards,
                     min_compressions=60 // n)


def test_prefill_cut_threshold(tmp_path):
    """The prefill is cut exactly when P >= B + N (the slack trigger's ``>=``, 901-902), at B + N included."""
    for prompt, held in ((11, 11), (12, 8), (13, 8)):
        kvbench, *_ = seeded(tmp_path, 0, 2, 8, 4, prompt, steps=0)
        assert {len(h) for layer in kvbench[0] for h in layer} == {held}


def near_ties(kvbench, theirs, trace, agreement, tolerance=1e-5):
    """At the first difference, every entry one side alone keeps scores within ``tolerance`` of one the other alone
    keeps (without the noise)."""
    t = agreement.forwards - 1
    for mine, source in zip(kvbench[t], theirs[t], strict=True):
        for kv, (a, b) in enumerate(zip(mine, source, strict=True)):
            if a == b:
                continue
            _, _, positions, scores = next(x for x in trace if x[0] == t and x[1] == kv)
            score = dict(zip(positions, scores.tolist(), strict=True))
            if not all(any(abs(score[p] - score[q]) < tolerance for q in b - a) for p in a - b):
                return False
    return True


def test_noise(tmp_path):
    """Difference 1 on continuous scores: the source's seeded noise (1e-6 on z-scores) against kvbench's none.
    Seeds 0-9, three cases, groups 1, 2, 7: every compression identical with the noise on (any difference would
    have to be a near-tie); identical without it."""
    compressions = identical = 0
    for seed in range(10):
        for budget, n, prompt, m, head_dim in ((16, 4, 6, 65536, 8), (24, 8, 10, 64, 8), (40, 6, 20, 65536, 16)):
            for group in GROUPS:
                kvbench, forwards, payload, rotary = seeded(tmp_path, seed, group, budget, n, prompt, m, head_dim)
                trace = []
                plain = reference(forwards, Config(budget, n, m), payload, rotary, trace)
                assert_identical(kvbench, plain, forwards, min_compressions=len(schedule(budget, n, prompt)))
                noisy = reference(forwards, Config(budget, n, m, noise=True), payload, rotary)
                agreement = compare(kvbench, noisy, forwards)
                log(NAME, f"seeded seed {seed} group {group} {budget}/{n}/{prompt}/{m}/{head_dim} noise", agreement)
                compressions += agreement.compressions
                identical += agreement.identical
                if agreement.first_difference:
                    assert near_ties(kvbench, noisy, trace, agreement), agreement
    assert (identical, compressions) == (690, 690)


def test_exact_ties(tmp_path):
    """Difference 1 on exact ties: zero statistics make every z-score 0. kvbench keeps the newest B - P decoded
    entries; the source CPU ``topk``'s pick without the noise, a random one with it; ranked newest first, identical."""
    for group in GROUPS:
        kvbench, forwards, payload, rotary = seeded(tmp_path, 5, group, 16, 4, 6, zero_stats=True)
        for t in schedule(16, 4, 6):
            newest = set(range(6)) | set(range(6 + t - 10, 6 + t))
            assert all(h == newest for layer in kvbench[t] for h in layer), t
        trace = []
        reference(forwards, Config(16, 4), payload, rotary, trace)
        for noise in (False, True):
            theirs = reference(forwards, Config(16, 4, noise=noise), payload, rotary)
            agreement = compare(kvbench, theirs, forwards)
            log(NAME, f"seeded zero statistics group {group} noise {noise}", agreement)
            assert agreement.forwards == schedule(16, 4, 6)[0] + 1 and agreement.first_difference
            assert near_ties(kvbench, theirs, trace, agreement)  # test_noise's check passes on true ties
        assert_identical(kvbench, reference(forwards, Config(16, 4, ties="newest"), payload, rotary), forwards,
                         NAME, f"seeded zero statistics group {group} newest", min_compressions=12)


@dataclasses.dataclass(frozen=True)
class ScaledRope:
    """Standard RoPE whose cos and sin carry a scale per frequency (no HF RoPE does: theirs is one constant)."""

    head_dim: int
    scale: tuple

    @property
    def inv_freq(self):
        return StandardRope(self.head_dim).inv_freq

    def __call__(self, positions):
        cos, sin = StandardRope(self.head_dim)(positions)
        s = torch.tensor(self.scale * 2, dtype=torch.float32)
        return cos * s, sin * s


def test_rope_scale(tmp_path):
    """Difference 3: the source's scale is ``cos0[0::2]`` -- frequencies 0, 2, 0, 2 of four --, kvbench each
    frequency's. One constant (YaRN-like 1.3, with or without the source's ``attention_scale``): identical."""
    uniform, varied = ScaledRope(8, (1.3,) * 4), ScaledRope(8, (1.0, 1.5, 0.7, 1.2))
    assert torch.equal(frequency_scale(Rotary(varied, varied.inv_freq), 8), torch.tensor([1.0, 0.7, 1.0, 0.7]))
    for seed in range(3):
        kvbench, forwards, payload, _ = seeded(tmp_path, seed, 2, 16, 4, 6, rope=uniform)
        for a in (1.0, 1.3):
            assert_identical(kvbench, reference(forwards, Config(16, 4), payload, Rotary(uniform, uniform.inv_freq, a)),
                             forwards, min_compressions=12)
        kvbench, forwards, payload, rotary = seeded(tmp_path, seed, 2, 16, 4, 6, rope=varied)
        trace = []
        theirs = reference(forwards, Config(16, 4), payload, rotary, trace)
        agreement = compare(kvbench, theirs, forwards)
        assert agreement.forwards == schedule(16, 4, 6)[0] + 1 and agreement.first_difference
        assert not near_ties(kvbench, theirs, trace, agreement)  # ... and fails on a different rule
        assert_identical(kvbench, reference(forwards, Config(16, 4, freq="per_frequency"), payload, rotary), forwards,
                         NAME, f"seeded per-frequency RoPE scale seed {seed}", min_compressions=12)


def test_bfloat16(tmp_path):
    """Difference 4 is none: on bfloat16 keys the source casts to float32 and scores there (627, 715), as kvbench."""
    rope = StandardRope(8)
    for group in GROUPS:
        forwards = [dataclasses.replace(f, keys=f.keys.bfloat16(), values=f.values.bfloat16(),
                                        queries=f.queries.bfloat16())
                    for f in rotated(synthetic_forwards(group, group=group, prompt=6), rope)]
        payload = write_stats(tmp_path / "bf16.pt", 2, 2 * group, 8, group)
        kvbench = run_cache(press(tmp_path / "bf16.pt", 4), 16, forwards, rope=rope)
        assert_identical(kvbench, reference(forwards, Config(16, 4), payload, Rotary(rope, rope.inv_freq)), forwards,
                         NAME, f"seeded bfloat16 group {group}", min_compressions=12)


def test_stats_order(tmp_path):
    """A file listing every head but not layer by layer: the source pairs score rows by list index (399-404) with rows
    stacked by layer (241-247); kvbench reads heads by name. A file missing heads is refused."""
    shuffled = [[1, 0], [0, 1], [0, 0], [1, 1]]  # group 1: two query heads per layer
    kvbench, forwards, payload, rotary = seeded(tmp_path, 1, 1, 16, 4, 6, heads=shuffled)
    assert compare(kvbench, reference(forwards, Config(16, 4), payload, rotary), forwards).first_difference
    ordered = {**payload, "metadata": {**payload["metadata"], "sampled_heads": sorted(shuffled)}}
    assert_identical(kvbench, reference(forwards, Config(16, 4), ordered, rotary), forwards, min_compressions=12)
    write_stats(tmp_path / "partial.pt", 2, 4, 8, heads=[[0, 0], [1, 3]])
    with pytest.raises(PressError, match="not every head"):
        press(tmp_path / "partial.pt", 4)


def calibrated(tmp_path, model, tokenizer, name):
    path = tmp_path / f"{name}.pt"
    payload = query_statistics(model, tokenizer(CALIBRATION)["input_ids"])
    torch.save(payload, path)
    return path, payload


@pytest.mark.parametrize("group", GROUPS)
def test_in_situ(tmp_path, group):
    """A 55-token prompt: under budgets 64 and 56, between 50 and 50 + 8, and over 40 + 8 (difference 2)."""
    model, tokenizer = tiny_model(group)
    path, payload = calibrated(tmp_path, model, tokenizer, f"tiny-{group}")
    prompt = tokenizer(PROMPT)["input_ids"]
    assert len(prompt) == 55
    for budget, n in ((64, 8), (56, 6), (50, 8), (40, 8)):
        forwards, kept = trace_model(model, prompt, press(path, n), budget, max_new_tokens=60)
        case = f"tiny-llama group {group} B/N {budget}/{n}"
        if len(prompt) < budget + n:
            trace = []
            assert_identical(kept, reference(forwards, Config(budget, n), payload, model_rotary(model), trace),
                             forwards, NAME, case, min_compressions=len(schedule(budget, n, len(prompt), 59)))
            noisy = reference(forwards, Config(budget, n, noise=True), payload, model_rotary(model))
            agreement = compare(kept, noisy, forwards)
            log(NAME, f"{case} noise", agreement)
            assert agreement.first_difference is None or near_ties(kept, noisy, trace, agreement), agreement
            continue
        agreement = compare(kept, reference(forwards, Config(budget, n), payload, model_rotary(model)), forwards)
        log(NAME, case, agreement)
        assert agreement.forwards == 1 and agreement.first_difference
        assert_identical(kept, reference(forwards, Config(budget, n, prefill_cut=True), payload, model_rotary(model)),
                         forwards, NAME, f"{case} prefill cut", min_compressions=60 // n)


def test_yarn(tmp_path):
    """In situ with YaRN (attention scaling 1.139 in every frequency's cos and sin): identical."""
    model, tokenizer = build_tiny("tiny-llama", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  hidden_size=64, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                                "original_max_position_embeddings": 2048})
    model.eval()
    rotary = model_rotary(model)
    assert abs(rotary.attention_scaling - 1.1386) < 1e-3
    assert torch.allclose(frequency_scale(rotary, 16), frequency_scale(rotary, 16, "per_frequency"))
    path, payload = calibrated(tmp_path, model, tokenizer, "yarn")
    forwards, kept = trace_model(model, tokenizer(PROMPT)["input_ids"], press(path, 8), 64, max_new_tokens=60)
    assert_identical(kept, reference(forwards, Config(64, 8), payload, rotary), forwards, NAME,
                     "tiny-llama yarn group 2 B/N 64/8", min_compressions=6)
