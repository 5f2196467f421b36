"""Independent oracles: a full-sequence forward in which each query sees exactly a given set of positions, HF
``generate`` with transformers' own cache, and a meter of the bytes every operation allocates.

The masked forward is plain float32 matmul-softmax attention and shares no code with kvbench's engine: what the
engine says it kept, attended here from scratch, must give the engine's logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface

MASKS: dict[int, torch.Tensor] = {}  # layer -> [H_kv or H_q, L, L] bool, True = may attend
#: layer -> [H_kv, L]: full causal attention mass each query puts on the positions its mask hides
MISSED: dict[int, torch.Tensor] = {}
#: layer -> what the masked forward computed: post-RoPE queries [H_q, L, D], keys [H_kv, L, D], and the
#: attention probabilities [H_q, L, L] (zero where masked)
QUERIES: dict[int, torch.Tensor] = {}
KEYS: dict[int, torch.Tensor] = {}
PROBS: dict[int, torch.Tensor] = {}


def _masked_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    group = query.shape[1] // key.shape[1]
    mask = MASKS[module.layer_idx]  # per KV head, or per query head (a selection: Quest)
    mask = mask if mask.shape[0] == query.shape[1] else mask.repeat_interleave(group, dim=0)
    k = key.float().repeat_interleave(group, dim=1)
    v = value.float().repeat_interleave(group, dim=1)
    raw = query.float() @ k.transpose(-1, -2) * scaling
    probs = torch.softmax(raw.masked_fill(~mask[None], float("-inf")), dim=-1)
    layer = module.layer_idx
    QUERIES[layer], KEYS[layer], PROBS[layer] = query[0].float(), key[0].float(), probs[0]
    length = query.shape[2]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    full = torch.softmax(raw.masked_fill(~causal, float("-inf")), -1)
    hidden = causal & ~mask[None]
    MISSED[layer] = (full * hidden).sum(-1)[0].view(key.shape[1], group, length).mean(1)
    return (probs @ v).transpose(1, 2).contiguous().to(query.dtype), None


AttentionInterface.register("oracle_masked", _masked_attention)
AttentionMaskInterface.register("oracle_masked", lambda *a, **k: None)


def masked_logits(model, tokens: list[int], masks: dict[int, torch.Tensor]) -> torch.Tensor:
    """Logits [L, V] of a forward over ``tokens`` with per-layer masks, per KV head or per query head."""
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
            for h, held in enumerate(kept_after[q - prompt_len][layer]):
                if held:
                    m[h, q, sorted(held)] = True
                m[h, q, q] = True
        masks[layer] = m
    return masks


def hf_greedy(model, prompt: list[int], n_new: int) -> list[int]:
    """``n_new`` greedy tokens from transformers' own ``generate`` and ``DynamicCache``."""
    from kvbench.engine.decode import cache_argument

    cache = {cache_argument(model): DynamicCache()}  # the name this transformers' generate takes
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                         eos_token_id=None, pad_token_id=0, **cache)
    return out[0, len(prompt):].tolist()


class AllocationMeter(TorchDispatchMode):
    """Bytes of every tensor that an operation creates (views excluded: they allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.bytes += t.untyped_storage().nbytes()
        return out


class AttentionOutputs:
    """Records each layer's attention output before its output projection, per forward: where a wrong logit
    first went wrong (layer, query head). A context manager; ``outputs[layer]`` lists [L, H_q, D] tensors."""

    def __init__(self, model):
        self.projections = [layer.self_attn.o_proj for layer in _decoder_layers(model)]
        self.heads = model.config.num_attention_heads
        self.outputs: list[list[torch.Tensor]] = [[] for _ in self.projections]
        self._handles: list = []

    def __enter__(self) -> AttentionOutputs:
        for layer, projection in enumerate(self.projections):
            self._handles.append(projection.register_forward_pre_hook(self._recorder(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _recorder(self, layer: int) -> Callable:
        def record(module, args):
            hidden = args[0][0].float()  # [L, H_q * D] of sequence 0
            self.outputs[layer].append(hidden.reshape(hidden.shape[0], self.heads, -1).clone())
        return record


def _decoder_layers(model):
    base = getattr(model, "model", model)
    base = getattr(base, "language_model", base)
    return base.layers
