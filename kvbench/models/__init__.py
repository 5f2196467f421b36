"""Models: resolving a name (alias, hub id, directory, GGUF) and loading it (``loading``), the check that its
tokenizer encodes as its files do (``tokenizer_guard``), and the BOS the paper's harness put before raw text
(``fork_tokenizer``).

May import: ``errors`` (torch and transformers inside functions); never the engine, runs or the store.
"""

from kvbench.models.loading import (
    ALIASES,
    DEFAULT_MODEL,
    MODELS_TABLE,
    SHAPES_DIR,
    SMOLLM2_HF_ID,
    SMOLLM2_PACKAGE,
    TINY_CONFIGS,
    LoadedModel,
    ModelNotFoundError,
    ModelSpec,
    build_random,
    build_tiny,
    byte_tokenizer,
    cached_revision,
    default_system_prompt,
    known_models,
    load,
    model_config,
    model_settings,
    model_shape,
    resolve,
    resolve_device,
    resolve_dtype,
    shape_aliases,
    smollm2_gguf,
)

__all__ = [
    "ALIASES", "DEFAULT_MODEL", "MODELS_TABLE", "SHAPES_DIR", "SMOLLM2_HF_ID", "SMOLLM2_PACKAGE",
    "TINY_CONFIGS", "LoadedModel", "ModelNotFoundError", "ModelSpec", "build_random", "build_tiny",
    "byte_tokenizer", "cached_revision", "default_system_prompt", "known_models", "load", "model_config",
    "model_settings", "model_shape", "resolve", "resolve_device", "resolve_dtype", "shape_aliases", "smollm2_gguf",
]
