"""Independent oracle: a full-sequence forward where each query sees exactly a given set of positions.

Plain float32 matmul-softmax attention; shares no code with kvbench's engine.
"""

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

MASKS: dict[int, torch.Tensor] = {}  # layer -> [H_kv, L, L] bool, True = may attend
#: layer -> [H_kv, L]: full causal attention mass each query puts on the positions its mask hides
MISSED: dict[int, torch.Tensor] = {}
#: layer -> what the masked forward computed: post-RoPE queries [H_q, L, D], keys [H_kv, L, D], and the
#: attention probabilities [H_q, L, L] (zero where masked)
QUERIES: dict[int, torch.Tensor] = {}
KEYS: dict[int, torch.Tensor] = {}
PROBS: dict[int, torch.Tensor] = {}


def _masked_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    mask = MASKS[module.layer_idx]
    group = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(group, dim=1)
    v = value.float().repeat_interleave(group, dim=1)
    logits = query.float() @ k.transpose(-1, -2) * scaling
    logits = logits.masked_fill(~mask.repeat_interleave(group, dim=0)[None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = probs @ v
    layer = module.layer_idx
    QUERIES[layer], KEYS[layer], PROBS[layer] = query[0].float(), key[0].float(), probs[0]
    length = query.shape[2]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    full = torch.softmax((query.float() @ k.transpose(-1, -2) * scaling).masked_fill(~causal, float("-inf")), -1)
    hidden = causal & ~mask.repeat_interleave(group, dim=0)[None]
    MISSED[module.layer_idx] = (full * hidden).sum(-1)[0].view(key.shape[1], group, length).mean(1)
    return out.transpose(1, 2).contiguous().to(query.dtype), None


AttentionInterface.register("oracle_masked", _masked_attention)
AttentionMaskInterface.register("oracle_masked", lambda *a, **k: None)


def masked_logits(model, tokens: list[int], masks: dict[int, torch.Tensor]) -> torch.Tensor:
    """Logits [L, V] of a forward over ``tokens`` with per-layer, per-KV-head masks."""
    MASKS.clear()
    MASKS.update(masks)
    MISSED.clear()
    previous = model.config._attn_implementation
    model.config._attn_implementation = "oracle_masked"
    try:
        with torch.no_grad():
            return model(torch.tensor([tokens]), use_cache=False).logits[0].float()
    finally:
        model.config._attn_implementation = previous


def masks_from_kept(kept_after: list, prompt_len: int, total_len: int, n_layers: int, n_heads: int):
    """Masks for a run whose cache held ``kept_after[t]`` (per layer, per head) after forward ``t``.

    Prompt queries attend causally (prefill compression happens after the prefill's attention); the query of
    decode forward t (position prompt_len + t - 1) sees what was kept after forward t - 1, plus itself.
    """
    masks = {}
    for layer in range(n_layers):
        m = torch.zeros(n_heads, total_len, total_len, dtype=torch.bool)
        m[:, :prompt_len, :prompt_len] = torch.ones(prompt_len, prompt_len, dtype=torch.bool).tril()
        for q in range(prompt_len, total_len):
            t = q - prompt_len + 1
            for h in range(n_heads):
                for p in kept_after[t - 1][layer][h]:
                    m[h, q, p] = True
                m[h, q, q] = True
        masks[layer] = m
    return masks
