"""The model's rotary position embedding, for a press that reads it (``Press.reads_rope``): undoing it on queries
(expected-attention) or keys (triattention), or scoring distances in its frequencies (triattention)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.errors import KvbenchError


@dataclass(frozen=True)
class ModelRope:
    """positions [n] -> the model's own RoPE (cos, sin) [n, rotary dims], float32; ``inv_freq`` [rotary dims / 2]
    the angle per position of each frequency (the model's ``rotary_emb.inv_freq``, scaled where its RoPE is)."""

    rotary: torch.nn.Module
    device: torch.device

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary(torch.zeros(1, device=self.device), positions[None].to(self.device))
        return cos[0].float(), sin[0].float()

    @property
    def inv_freq(self) -> torch.Tensor:
        return self.rotary.inv_freq.to(device=self.device, dtype=torch.float32)


@dataclass(frozen=True)
class StandardRope:
    """Plain RoPE (HF's layout: each frequency in both halves) of ``head_dim`` dims and base ``theta``: the RoPE of
    seeded tests, where there is no model."""

    head_dim: int
    theta: float = 10000.0

    @property
    def inv_freq(self) -> torch.Tensor:
        return 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()


def model_rope(model, press_name: str, device) -> ModelRope:
    """The RoPE of ``model`` (``model.model.rotary_emb``); one clear error for a model without one."""
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None:
        raise KvbenchError(f"{press_name}: needs a model with a rotary embedding (model.model.rotary_emb)")
    return ModelRope(rotary, torch.device(device))
