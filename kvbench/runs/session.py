"""A loaded model and how a protocol talks to it: prompt text, token ids, EOS ids and decoded responses."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from kvbench import __version__
from kvbench.models.fork_tokenizer import encode_raw, fork_adds_bos, tokenizer_config
from kvbench.tasks import Example, Task
from kvbench.tasks.extract import THINK_CLOSE, THINK_OPEN
from kvbench.tasks.protocols import Protocol, get_protocol


@dataclass
class Session:
    """A loaded model with what every cell run on it needs (loaded once per model, not per cell)."""

    loaded: object
    revision: str | None
    provenance: dict
    #: Full-cache references for teacher-forced fidelity, shared by every press and budget of a session.
    references: dict = field(default_factory=dict)

    def codec(self, task: Task) -> Codec:
        """Prompt rendering, encoding and decoding for ``task`` under the protocol it was prepared for."""
        protocol = get_protocol(task.protocol)
        return Codec(self.loaded.tokenizer, self.loaded.model, task, protocol,
                     fork_bos=self.fork_bos if protocol.raw_text else None)

    @cached_property
    def fork_bos(self) -> bool | None:
        """Whether the paper's harness's tokenizer put a BOS before raw text for this model (``fork_tokenizer``)."""
        spec = getattr(self.loaded, "spec", None)
        if spec is None:
            return None
        config = tokenizer_config(spec.path, spec.source, spec.revision)
        return fork_adds_bos(config, getattr(self.loaded.model.config, "model_type", None), spec.source == "gguf")


@dataclass
class Codec:
    """One protocol's way from an example to token ids and from generated ids back to text."""

    tokenizer: object
    model: object
    task: Task
    protocol: Protocol
    #: Raw text only: a BOS first or not, as the paper's harness's transformers decided (None: the tokenizer's own).
    fork_bos: bool | None = None

    def prompt(self, example: Example) -> str:
        """The text the model reads: the chat template over the task's messages, or the raw prompt."""
        if self.protocol.raw_text:
            return self.task.user_content(example)[0]
        return self.tokenizer.apply_chat_template(self.task.messages(example), tokenize=False,
                                                  add_generation_prompt=True)

    def encode(self, prompt: str) -> list[int]:
        # A rendered chat template carries its own BOS; raw text gets the one the fork's stack put there.
        if self.protocol.raw_text:
            return encode_raw(self.tokenizer, prompt, self.fork_bos)
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        """Generated ids as text without special tokens, except think tags that the tokenizer marks special."""
        if not self.protocol.keep_think_tags:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode([i for i in ids if i not in self._skipped_ids], skip_special_tokens=False)

    @cached_property
    def _skipped_ids(self) -> frozenset[int]:
        added = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        special = set(self.tokenizer.all_special_ids) | {i for i, token in added.items() if token.special}
        names = self.tokenizer.convert_ids_to_tokens(sorted(special))
        return frozenset(i for i, name in zip(sorted(special), names) if name not in (THINK_OPEN, THINK_CLOSE))

    @property
    def eos(self) -> tuple[int, ...]:
        """The ids that end a response: the generation config's and the tokenizer's, or one of them."""
        configured = self.model.generation_config.eos_token_id
        configured = [configured] if isinstance(configured, int) else list(configured or [])
        own = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        ids = {"all": configured + own, "tokenizer": own, "generation_config": configured or own}[self.protocol.eos]
        return tuple(dict.fromkeys(ids))


def load_session(model: str, dtype: str = "auto", device: str = "auto", seed: int = 0,
                 random_weights: bool = False) -> Session:
    """The model loaded once, with the provenance every stored row carries (``run``, ``fidelity``, ``bench``)."""
    import torch
    import transformers

    from kvbench import models

    loaded = models.load(model, dtype=dtype, device=device, seed=seed, random_weights=random_weights)
    provenance = {
        "kvbench_version": __version__, "git_commit": git_commit(), "torch_version": torch.__version__,
        "transformers_version": transformers.__version__, "device": device_name(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
    }
    revision = models.cached_revision(loaded.spec) or getattr(loaded.model.config, "_commit_hash", None)
    return Session(loaded=loaded, revision=revision, provenance=provenance)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"
