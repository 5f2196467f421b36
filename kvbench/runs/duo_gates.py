"""Head gates for ``rlkv`` by DuoAttention's optimisation (``kvbench calibrate --gates``), for any model.

DuoAttention's procedure as RLKV's repository runs it (``base/duo_attn/train.py``, ``data.py``, the two-way forward
of ``base/patch/llama.py``): the model is frozen; each KV head gets a gate α (initially 1). A batch is a passkey
retrieval sample run twice: the first copy through the model as it is, the second with each layer's attention
replaced by ``α · (the first copy's attention output) + (1 − α) · (its own streaming attention over the first
``sink`` and last ``recent`` tokens)``. The loss is the mean squared difference of the two copies' last hidden states
on the answer tokens, plus ``reg_weight`` times the mean gate; AdamW (``lr``, no weight decay) with DuoAttention's
warm-up and decay schedule, gates clamped to [0, 1] before each step. The gates are written as
``full_attention_heads.tsv`` is: one row per layer, one column per KV head.

The samples follow ``MultiplePasskeyRetrievalDataset``'s template (needles of ``passkey_length`` words from the
NATO alphabet at sorted random depths in a haystack, the questions and answers after it); the haystack is the text
given (DuoAttention's: BookSum, repeated here where the text is shorter than a sample). Differences: token-level
streaming attention (DuoAttention's runs use its 128-token block-sparse kernel); the sample lengths and step count
are the caller's (DuoAttention: 1,000 to 32,000 tokens, 2,000 steps, sink 128 + recent 256, on 2 GPUs); one process,
float32 where the model is; samples drawn from a seeded generator, not padded to a multiple of 16.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_MIXED = "kvbench-duo-gates"
ALPHABET = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett", "kilo", "lima",
    "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey",
    "xray", "yankee", "zulu",
)
ORDINALS = (
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth", "eleventh",
    "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth", "eighteenth", "nineteenth",
    "twentieth",
)


@dataclass(frozen=True)
class GateTraining:
    """DuoAttention's hyperparameters (``scripts/train_duo.sh``), the lengths and steps scaled by the caller."""

    sink: int = 128
    recent: int = 256
    steps: int = 2000
    lr: float = 0.02
    reg_weight: float = 0.05
    context_min: int = 1000
    context_max: int = 32000
    passkeys: int = 10
    passkey_length: int = 32
    seed: int = 0


def passkey_sample(tokenizer, haystack: list[int], length: int, config: GateTraining,
                   rng: random.Random) -> tuple[list[int], list[int]]:
    """(input ids, labels: -100 but on the answers) of a retrieval sample of about ``length`` haystack tokens."""
    def encode(text: str, special: bool = False) -> list[int]:
        return tokenizer(text, add_special_tokens=special)["input_ids"]

    separator = encode("\n\n")
    passkeys = [encode(" ".join(rng.choice(ALPHABET) for _ in range(config.passkey_length)))
                for _ in range(config.passkeys)]
    depths = sorted(rng.sample(range(5, 96), config.passkeys))  # DuoAttention: 0.05 to 0.95 of the haystack
    hay = (haystack * (length // max(len(haystack), 1) + 1))[:length]
    context, last = [], 0
    for i, (depth, passkey) in enumerate(zip(depths, passkeys)):
        point = len(hay) * depth // 100
        needle = encode(f"Remeber this sequence of words, it's the {ORDINALS[i]} passkey to the vault: ") + passkey
        context += hay[last:point] + separator + needle + separator
        last = point
    context = encode("This is a very long story book: <book> ", special=True) + context + hay[last:]
    context += encode(" </book>.\n\n")
    qa = []
    for i, passkey in enumerate(passkeys):
        question = encode(f"Based on the content of the book, what is the {ORDINALS[i]} passkey to the vault?\n"
                          "Passkey: ")
        qa += question + passkey + separator
    return context + qa, [-100] * len(context) + qa  # the loss reads every question and answer token


def streaming_mask(length: int, sink: int, recent: int, device) -> torch.Tensor:
    """[L, L]: each query sees the first ``sink`` keys and its ``recent`` newest (itself included), causally
    (``generate_streaming_mask``)."""
    i = torch.arange(length, device=device)
    causal = i[None, :] <= i[:, None]
    return causal & ((i[None, :] < sink) | (i[:, None] - i[None, :] < recent))


@contextlib.contextmanager
def mixed_attention(model, gates: torch.nn.Parameter, sink: int, recent: int):
    """Route ``model``'s attention through the two-way forward: rows [:B] full, rows [B:] mixed by ``gates``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attend(module, query, key, value, attention_mask, scaling=None, **kwargs):
        b, hq, length, _ = query.shape
        half, h = b // 2, key.shape[1]
        with torch.no_grad():
            full = F.scaled_dot_product_attention(query[:half], key[:half], value[:half], is_causal=True,
                                                  scale=scaling, enable_gqa=True)
        mask = streaming_mask(length, sink, recent, query.device)
        stream = F.scaled_dot_product_attention(query[half:], key[half:], value[half:], attn_mask=mask,
                                                scale=scaling, enable_gqa=True)
        alpha = gates[module.layer_idx].clamp(0, 1).repeat_interleave(hq // h)[None, :, None, None]
        out = torch.cat([full, (1 - alpha) * stream + alpha * full])
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(_MIXED, attend)
    AttentionMaskInterface.register(_MIXED, sdpa_mask)
    previous = model.config._attn_implementation
    model.config._attn_implementation = _MIXED
    try:
        yield
    finally:
        model.config._attn_implementation = previous


def train_gates(model, tokenizer, haystack_text: str, config: GateTraining,
                on_step=None) -> tuple[torch.Tensor, list[float]]:
    """The trained gates [layers, KV heads] and the loss at each step."""
    text_config = model.config
    kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    device = next(model.parameters()).device
    for param in model.parameters():
        param.requires_grad_(False)
    gates = torch.nn.Parameter(torch.ones(text_config.num_hidden_layers, kv_heads, device=device))
    optimizer = torch.optim.AdamW([gates], lr=config.lr, weight_decay=0)
    fifth = max(config.steps // 5, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        1, max((step + 1) / fifth, 0.1), max((config.steps - step) / fifth, 0.1)))
    rng = random.Random(config.seed)
    haystack = tokenizer(haystack_text, add_special_tokens=False)["input_ids"]
    lengths = torch.linspace(config.context_min, config.context_max, 50).int().tolist()
    losses = []
    with mixed_attention(model, gates, config.sink, config.recent):
        for step in range(config.steps):
            with torch.no_grad():
                gates.clamp_(0, 1)
            ids, labels = passkey_sample(tokenizer, haystack, rng.choice(lengths), config, rng)
            hidden = model.model(input_ids=torch.tensor([ids, ids], device=device)).last_hidden_state
            answer = torch.tensor(labels, device=device) != -100
            distill = (hidden[0][answer].float() - hidden[1][answer].float()).pow(2).mean(-1).sum() / answer.sum()
            loss = distill + config.reg_weight * gates.abs().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            if on_step:
                on_step(step + 1, losses[-1])
    return gates.detach().clamp(0, 1).cpu(), losses
