"""TriAttention's calibration and the press as a user runs it: the statistics file (kvbench calibrate's and the
source's shipped layout), the prompt kept whole, every layer keeping the same positions per KV head.

The rule against the source itself: ``tests/reference/test_triattention.py``.
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from kvbench.cli import app
from kvbench.engine.generate import generate
from kvbench.engine.settings import GenerationSettings
from kvbench.errors import KvbenchError
from kvbench.models import build_tiny
from kvbench.presses import PressError, make_press
from kvbench.presses.triattention import load_frequency_stats
from kvbench.runs.calibrate import SAMPLE_TEXT, query_statistics
from tests.conftest import TINY_STATISTICS, prompt_ids

#: The metadata keys of the files TriAttention ships (triattention/calibration/for_aime24_experiment/*.pt).
SHIPPED_METADATA = {"rope_style", "sampled_heads", "head_dim", "model_name"}


def _projected_queries(model, ids: list[int], layer: int) -> torch.Tensor:
    """[H_q, n, d] pre-RoPE queries of ``layer`` re-projected from its input (q_proj or the fused qkv_proj, then
    Qwen3's q_norm): the oracle, computed without kvbench's capture or RoPE inversion."""
    attn = model.model.layers[layer].self_attn
    seen = {}

    def keep_input(module, args, kwargs):
        seen["h"] = kwargs["hidden_states"]

    hook = attn.register_forward_pre_hook(keep_input, with_kwargs=True)
    with torch.no_grad():
        model(torch.tensor([ids]))
        hook.remove()
        hidden, d = seen["h"], attn.head_dim
        width = attn.config.num_attention_heads * d
        q = attn.q_proj(hidden) if hasattr(attn, "q_proj") else attn.qkv_proj(hidden)[..., :width]
        q = q.view(1, len(ids), -1, d)
        q = attn.q_norm(q) if hasattr(attn, "q_norm") else q
    return q.transpose(1, 2)[0]


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen3", "tiny-phi3"])
def test_calibration_is_the_mean_of_the_pre_rope_queries(arch):
    """Per head and frequency: the complex mean and mean modulus of the queries before RoPE (dims i and i + r/2 of
    the rotated part, then the unrotated dims likewise, for Phi-3's partial RoPE)."""
    model, tokenizer = build_tiny(arch)
    model.eval()
    ids = tokenizer(SAMPLE_TEXT)["input_ids"]
    payload = query_statistics(model, ids)
    rotary = int(model.model.rotary_emb.inv_freq.numel() * 2)
    for layer in range(model.config.num_hidden_layers):
        q = _projected_queries(model, ids, layer)
        d = q.shape[-1]
        real = torch.cat([q[..., : rotary // 2], q[..., rotary: rotary + (d - rotary) // 2]], dim=-1)
        imag = torch.cat([q[..., rotary // 2: rotary], q[..., rotary + (d - rotary) // 2:]], dim=-1)
        pairs = torch.complex(real, imag)
        for head in range(q.shape[0]):
            got = payload["stats"][f"layer{layer:02d}_head{head:02d}"]
            mean = torch.complex(got["q_mean_real"], got["q_mean_imag"])
            assert torch.allclose(mean, pairs[head].mean(0), atol=1e-5), (arch, layer, head)
            assert torch.allclose(got["q_abs_mean"], pairs[head].abs().mean(0), atol=1e-5), (arch, layer, head)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert rotary < head_dim if arch == "tiny-phi3" else rotary == head_dim


def test_calibrate_writes_the_layout_triattention_ships(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT)
    out = tmp_path / "stats" / "tiny.pt"
    result = CliRunner().invoke(app, ["calibrate", "--model", "tiny-llama", "--text", str(text), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "12 query heads over 3 layers, head dim 16" in result.output
    payload = torch.load(out, weights_only=True)
    assert set(payload["metadata"]) >= SHIPPED_METADATA and payload["metadata"]["rope_style"] == "half"
    assert sorted(payload["stats"]) == [f"layer{la:02d}_head{h:02d}" for la in range(3) for h in range(4)]
    assert {k: v.shape for k, v in payload["stats"]["layer02_head03"].items()} == {
        "q_mean_real": (8,), "q_mean_imag": (8,), "q_abs_mean": (8,)}


def test_reads_a_file_in_the_shipped_layout(tmp_path):
    """Only the shipped files' metadata, heads listed in any order: each head's numbers land at its place."""
    g = torch.Generator().manual_seed(0)
    heads = [[layer, head] for head in range(4) for layer in (2, 0, 1)]
    stats = {f"layer{la:02d}_head{h:02d}": {name: torch.randn(8, generator=g) for name in
                                             ("q_mean_real", "q_mean_imag", "q_abs_mean")} for la, h in heads}
    path = tmp_path / "shipped.pt"
    torch.save({"metadata": {"rope_style": "half", "sampled_heads": heads, "head_dim": 16, "model_name": "x"},
                "stats": stats}, path)
    loaded = load_frequency_stats(str(path))
    assert loaded.q_mean.shape == (3, 4, 8)
    entry = stats["layer01_head02"]
    assert torch.equal(loaded.q_mean[1, 2], torch.complex(entry["q_mean_real"], entry["q_mean_imag"]))
    assert torch.equal(loaded.q_abs_mean[1, 2], entry["q_abs_mean"])
    del stats["layer01_head02"]
    heads.remove([1, 2])
    torch.save({"metadata": {"rope_style": "half", "sampled_heads": heads}, "stats": stats}, path)
    with pytest.raises(ValueError, match="holds 11 heads, not every head"):
        load_frequency_stats(str(path))


def _kept(prompt_length: int, budget: int, steps: int = 40):
    model, tokenizer = build_tiny("tiny-llama")
    model.eval()
    prompt = (prompt_ids(tokenizer) * 3)[:prompt_length]
    press = make_press("triattention", {"stats": TINY_STATISTICS, "buffer": "4"})
    kept = []
    out = generate(model, [prompt], press, budget, GenerationSettings(max_new_tokens=steps),
                   on_step=lambda cache, step: kept.append(cache.kept_positions(0)))
    return kept, out[0]


def test_the_prompt_is_kept_and_every_layer_keeps_the_same_positions():
    kept, out = _kept(prompt_length=12, budget=20)
    assert out.evicted_tokens > 0
    for step in kept:
        for layer in step:
            for head, positions in enumerate(layer):
                assert set(range(12)) <= positions
                assert positions == step[0][head]  # one score per KV head, shared by the layers
    assert kept[-1][0][0] != kept[-1][0][1]  # the KV heads choose apart


def test_a_prompt_longer_than_the_budget_keeps_its_first_budget_entries():
    """The source keeps the first ``budget`` prompt entries when the prompt fills the budget."""
    kept, out = _kept(prompt_length=30, budget=16)
    compressed = [step for step in kept if len(step[0][0]) == 16]
    assert len(compressed) == 1 + 39 // 4  # the prefill's, then one every 4 of the 39 decoding forwards
    assert all(positions == set(range(16)) for step in compressed for layer in step for positions in layer)
    assert all(set(range(16)) <= positions for step in kept for layer in step for positions in layer)


def test_wrappers_that_split_budgets_are_refused():
    with pytest.raises(PressError, match="same positions in every layer"):
        make_press("adakv:triattention", {"stats": TINY_STATISTICS})


def test_statistics_of_another_shape_are_one_clear_error(tmp_path):
    model, tokenizer = build_tiny("tiny-llama", num_attention_heads=6, num_key_value_heads=2, hidden_size=96)
    payload = query_statistics(model.eval(), tokenizer(SAMPLE_TEXT)["input_ids"])
    torch.save(payload, tmp_path / "six.pt")
    small, tokenizer = build_tiny("tiny-llama")
    press = make_press("triattention", {"stats": str(tmp_path / "six.pt"), "buffer": "4"})
    with pytest.raises(KvbenchError, match=r"\(3 layers x 6 query heads of 16 dims\); this model has 3 x 4 of 16"):
        generate(small.eval(), [prompt_ids(tokenizer)], press, 8, GenerationSettings(max_new_tokens=12))
