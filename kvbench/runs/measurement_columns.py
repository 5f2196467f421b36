"""The optional measurements of a run as store columns: critical-token retention and attention loss."""

from __future__ import annotations

import json

from kvbench.tasks import Example, Task


def critical_token_positions(tokenizer, task: Task, example: Example, prompt: str) -> list[int]:
    """Token positions of the example's quantities, names and option labels in the templated prompt."""
    content, _ = task.user_content(example)
    start = prompt.find(content)
    if start < 0:  # a chat template that rewrites the message: no reliable mapping
        return []
    spans = [(start + a, start + b) for a, b in task.critical_spans(example)]
    offsets = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [i for i, (a, b) in enumerate(offsets) if b > a and any(a < y and x < b for x, y in spans)]


def retention_columns(retention) -> dict:
    """Mean over forwards and layers, value after the last forward, per-layer means (None: not measured)."""
    if retention is None or retention.numel() == 0 or retention.isnan().all():
        return {}
    return {"retention_mean": float(retention.nanmean()), "retention_end": float(retention[:, -1].nanmean()),
            "retention_profile": json.dumps({"per_layer": [round(float(v), 5) for v in retention.nanmean(dim=1)]})}


HEATMAP_BINS = 32


def attention_loss_columns(loss, max_new_tokens: int) -> dict:
    """Mean, max and a compact profile of a [layers, steps, heads] attention-loss log (None: not measured)."""
    if loss is None:
        return {}
    if loss.shape[1] == 0:
        return {"attention_loss_mean": 0.0, "attention_loss_max": 0.0}
    per_step = loss.mean(dim=-1)  # [layers, steps], heads averaged
    width = -(-max_new_tokens // HEATMAP_BINS)  # steps per bin: the same grid for every row of a run
    bins = [[round(float(layer[i:i + width].mean()), 5) if i < layer.shape[0] else None
             for i in range(0, HEATMAP_BINS * width, width)] for layer in per_step]
    profile = {"per_layer": [round(float(v), 5) for v in per_step.mean(dim=1)], "bin_steps": width, "heatmap": bins}
    return {"attention_loss_mean": float(loss.mean()), "attention_loss_max": float(loss.max()),
            "attention_loss_profile": json.dumps(profile)}
