"""Per-model data a press reads: TriAttention's pre-RoPE query centres (``-a stats=FILE``), and head gates for
``rlkv`` (``-a gates=FILE``) by DuoAttention's optimisation (``kvbench.runs.duo_gates``).

TriAttention's own procedure (``scripts/calibrate.py`` of WeianMao/triattention): one forward over plain text (any
coherent text; up to 32,768 tokens), every layer's queries with RoPE undone, and per query head and RoPE frequency
the mean of the queries as complex numbers and the mean of their moduli. kvbench takes the queries attention
received (so any architecture's projections and norms are the model's own, Qwen3's ``q_norm`` included, which the
source script's re-projection leaves out) and writes the file in the source's layout, which the press also reads
from TriAttention's shipped files.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from kvbench.engine.rope import model_rope
from kvbench.errors import ConfigError
from kvbench.presses.triattention import unrotated_pairs
from kvbench.runs.duo_gates import ORDINALS, GateTraining, train_gates

#: TriAttention's ``--max-length`` default: the tokens of the text one forward reads.
MAX_TOKENS = 32768
_CAPTURE = "kvbench-calibrate"
#: What ``kvbench verify`` and the tests calibrate the tiny random models on (they have no domain to match).
SAMPLE_TEXT = ("Tom has 12 apples. He buys 7 more and gives 5 to Ann. How many apples does Tom have now? Tom starts "
               "with twelve apples; buying seven makes nineteen, and giving five away leaves fourteen. So the answer "
               "is 14. A train leaves at 3 pm and travels 60 miles per hour for 2 hours: it covers 120 miles.")


def write_statistics(model, tokenizer, out: Path, text: str = SAMPLE_TEXT) -> Path:
    """Calibrate ``model`` on ``text`` and write the file (what ``verify`` does for each tiny model)."""
    torch.save(query_statistics(model, tokenizer(text)["input_ids"]), out)
    return out


def write_random_gates(model, out: Path, seed: int = 0) -> Path:
    """Seeded random gates in [0, 1], one per layer and KV head, in RLKV's tab-separated layout: for the tiny
    random models, which have no trained gates (RLKV's come from RL training, DuoAttention's from an optimisation),
    so that ``verify`` and the tests can check the engine under a head-budget press."""
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return write_gates(torch.rand(config.num_hidden_layers, heads, generator=torch.Generator().manual_seed(seed)), out)


def write_tiny_calibration(press_name: str, model, tokenizer, out_dir: Path) -> Path:
    """What a calibrated press reads, for a tiny model: TriAttention's statistics on the sample text, RLKV's
    gates seeded at random."""
    if press_name == "rlkv":
        return write_random_gates(model, out_dir / "gates.tsv")
    return write_statistics(model, tokenizer, out_dir / "statistics.pt")


def write_gates(gates: torch.Tensor, out: Path) -> Path:
    """[layers, KV heads] gates as DuoAttention's ``full_attention_heads.tsv`` (what ``-a gates=`` reads)."""
    out.write_text("\n".join("\t".join(f"{g:.6f}" for g in row) for row in gates.tolist()) + "\n")
    return out


#: The presses ``kvbench calibrate`` computes data for, and what each file is.
PRESSES = {"triattention": "statistics (.pt)", "rlkv": "gates (.tsv) by DuoAttention's optimisation"}


@dataclass(frozen=True)
class CalibrationConfig:
    model: str
    text: str  # path of a plain-text file
    out: str
    press: str = "triattention"
    max_tokens: int = MAX_TOKENS
    device: str = "auto"
    dtype: str = "auto"
    #: rlkv: DuoAttention's optimisation (``kvbench.runs.duo_gates.GateTraining``); None: its defaults.
    training: GateTraining | None = None


def validate(config: CalibrationConfig) -> str:
    """The text, read; one clear error before any model loads."""
    if config.press not in PRESSES:
        raise ConfigError(f"--press {config.press!r}: kvbench calibrate computes data for "
                          f"{', '.join(f'{k} ({v})' for k, v in PRESSES.items())}")
    if config.max_tokens < 2:
        raise ConfigError(f"--max-tokens must be at least 2, got {config.max_tokens}")
    _check_training(config.training or GateTraining())
    path = Path(config.text).expanduser()
    if not path.is_file():
        raise ConfigError(f"--text {config.text!r}: no such file, or not a regular one (any plain, coherent text "
                          "will do)")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ConfigError(f"--text {config.text!r} is empty")
    out = Path(config.out).expanduser()
    if out.exists() and not out.is_file() or not out.parent.exists() and out.parent.is_file():
        raise ConfigError(f"--out {config.out!r} cannot be written")
    return text


def _check_training(training: GateTraining) -> None:
    for name in ("sink", "recent", "steps", "context_min", "passkeys", "passkey_length"):
        if getattr(training, name) < (0 if name == "sink" else 1):
            raise ConfigError(f"--{name.replace('_', '-')} must be at least {0 if name == 'sink' else 1}")
    if training.context_max < training.context_min:
        raise ConfigError("--context-max must be at least --context-min")
    if training.sink + training.recent >= training.context_min:
        raise ConfigError(f"--sink + --recent ({training.sink + training.recent}) must be below --context-min "
                          f"({training.context_min}): streaming attention over the whole sample learns nothing")
    if training.passkeys > len(ORDINALS):
        raise ConfigError(f"--passkeys must be at most {len(ORDINALS)} (DuoAttention's ordinals)")
    if not (math.isfinite(training.lr) and training.lr > 0 and math.isfinite(training.reg_weight)):
        raise ConfigError("--lr must be a positive number and --reg-weight a finite one")


def calibrate(config: CalibrationConfig, on_step=None) -> dict:
    """Load the model, read the text and write the press's data to ``config.out``; what was written
    (``on_step(step, loss)`` follows the gates' optimisation)."""
    from kvbench.models import load

    text = validate(config)
    loaded = load(config.model, dtype=config.dtype, device=config.device)
    out = Path(config.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    if config.press == "rlkv":
        gates, losses = train_gates(loaded.model, loaded.tokenizer, text, config.training or GateTraining(), on_step)
        write_gates(gates, out)
        return {"gates": gates, "losses": losses}
    ids = loaded.tokenizer(text)["input_ids"][: config.max_tokens]
    if len(ids) < 2:
        raise ConfigError(f"--text {config.text!r} gives {len(ids)} token(s); calibration needs more")
    payload = query_statistics(loaded.model, ids, model_name=config.model)
    payload["metadata"]["text_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    torch.save(payload, out)
    return payload


@torch.no_grad()
def query_statistics(model, token_ids: list[int], model_name: str = "") -> dict:
    """One forward over ``token_ids``; per layer and query head, the pre-RoPE queries' complex mean and mean
    modulus in each RoPE frequency, in TriAttention's file layout."""
    captured: dict[int, torch.Tensor] = {}
    rope = model_rope(model, "calibrate", next(model.parameters()).device)
    with _capturing_queries(model, captured):
        model(torch.tensor([token_ids], device=next(model.parameters()).device), use_cache=False)
    stats, heads = {}, []
    n = len(token_ids)
    for layer in sorted(captured):
        queries = captured[layer].float()  # [1, H_q, n, d], post-RoPE
        positions = torch.arange(n, device=queries.device).expand(*queries.shape[:2], n)
        pairs, _, _ = unrotated_pairs(rope, queries, positions)  # [1, H_q, n, d/2]
        mean, modulus = pairs[0].mean(dim=1), pairs[0].abs().mean(dim=1)
        for head in range(pairs.shape[1]):
            stats[f"layer{layer:02d}_head{head:02d}"] = {
                "q_mean_real": mean[head].real.cpu(), "q_mean_imag": mean[head].imag.cpu(),
                "q_abs_mean": modulus[head].cpu()}
            heads.append([layer, head])
    head_dim = next(iter(captured.values())).shape[-1]
    rope_type = (getattr(model.config, "rope_scaling", None) or {}).get("rope_type", "default")
    metadata = {"num_traces": 1, "head_dim": int(head_dim), "rope_style": "half", "rope_type": rope_type,
                "model_name": model_name, "tokens": n, "calibrated_by": "kvbench calibrate",
                "sampled_heads": heads}
    return {"metadata": metadata, "stats": stats}


class _capturing_queries:
    """Route attention through SDPA while keeping each layer's post-RoPE queries."""

    def __init__(self, model, captured: dict[int, torch.Tensor]):
        self.model, self.captured = model, captured

    def __enter__(self):
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        captured = self.captured

        def capture(module, query, key, value, attention_mask, **kwargs):
            captured[module.layer_idx] = query.detach()
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(_CAPTURE, capture)
        AttentionMaskInterface.register(_CAPTURE, sdpa_mask)
        self.previous = self.model.config._attn_implementation
        self.model.config._attn_implementation = _CAPTURE
        return self

    def __exit__(self, *exc):
        self.model.config._attn_implementation = self.previous
