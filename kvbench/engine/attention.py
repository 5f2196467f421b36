"""A registered attention function over the cache's physical slots: the hook transformers calls.

Attention output always comes from ``scaled_dot_product_attention`` (no eager attention). The attention scores
presses ask for are computed apart (``kvbench.engine.scores``), over the same visible slots and mask.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from kvbench.errors import KvbenchError

if TYPE_CHECKING:
    from kvbench.engine.protocol import DecodingCache

IMPLEMENTATION = "kvbench"


def kvbench_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    kvbench_cache: DecodingCache | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Find the layer of the kvbench cache and let it attend over its slots (``key`` and ``value`` are what its
    ``update`` returned); masks come from the cache itself, never from transformers'."""
    if kvbench_cache is None:
        raise RuntimeError("the kvbench attention implementation needs kvbench_cache=BudgetCache(...)")
    _refuse_unsupported(module, kwargs, kvbench_cache.max_length)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = kvbench_cache.layers[module.layer_idx].attend(query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


def _refuse_unsupported(module: torch.nn.Module, kwargs: dict, length: int) -> None:
    """Attention variants the slot attention does not implement fail here rather than give a wrong answer."""
    window = kwargs.get("sliding_window")
    if window is not None and window < length:
        raise KvbenchError(f"{type(module).__name__}: sliding-window attention ({window} tokens) is not supported; "
                           f"kvbench evicts from full-attention caches only (this run needs {length} tokens)")
    for name, what in (("softcap", "attention logit soft-capping"), ("s_aux", "attention sinks")):
        if kwargs.get(name) is not None:
            raise KvbenchError(f"{type(module).__name__}: {what} is not supported by kvbench's attention")


def _no_mask(*args, **kwargs) -> None:
    return None  # masks come from the cache's own slot state, never from transformers' mask builders


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, kvbench_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, _no_mask)


@contextlib.contextmanager
def use_kvbench_attention(model):
    """Route ``model``'s attention through ``kvbench_attention`` for the duration of the block."""
    register()
    previous = model.config._attn_implementation
    model.config._attn_implementation = IMPLEMENTATION
    try:
        yield model
    finally:
        model.config._attn_implementation = previous
