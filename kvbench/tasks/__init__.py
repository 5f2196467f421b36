"""Datasets as declarative YAML configs (``datasets_cfg/<name>.yaml``), loaded into normalised examples.

A config declares a ``hub`` layout (Hugging Face ``datasets``) and/or a ``local`` layout (JSON Lines under
``--data-dir`` / ``KVBENCH_DATA_DIR``, ``<dir>/<local.dir>/<split>.jsonl``), or a built-in generator; each
layout maps its own fields to the same normalised example. Prompt template, generation defaults, extractor
chain and scorer are named, never coded, in the YAML. This package knows nothing about torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from kvbench.errors import ConfigError, DataError
from kvbench.tasks.arith import GENERATORS
from kvbench.tasks.critical import critical_spans, render_with_ranges
from kvbench.tasks.extract import EXTRACTORS, extract, opens_thinking
from kvbench.tasks.fields import LETTERS, TRANSFORMS, resolve_field, spec_transform_names
from kvbench.tasks.protocols import Protocol
from kvbench.tasks.score import SCORERS

CONFIG_DIR_ENV = "KVBENCH_DATASETS_CFG"
DATA_DIR_ENV = "KVBENCH_DATA_DIR"
_REQUIRED = ("name", "version", "prompt", "extractors", "scorer")


@dataclass(frozen=True)
class Example:
    id: str
    fields: dict  # what the prompt template may use (choices: a list of option texts)
    gold: str


@dataclass(frozen=True)
class Scored:
    extracted: str | None
    correct: bool
    metrics: dict

    def columns(self) -> dict:
        """The result-store columns this score fills."""
        return {"extracted": self.extracted, "correct": self.correct,
                "metrics": json.dumps(self.metrics, sort_keys=True)}


@dataclass(frozen=True)
class Task:
    name: str
    version: int
    prompt: str
    extractors: tuple[str, ...]
    scorer: str
    hub: dict | None = None
    local: dict | None = None
    builtin: dict | None = None
    system: str | None = None
    generation: dict = field(default_factory=dict)
    answer_type: str = "number"
    description: str = ""
    #: Per-protocol overrides (``protocols: {hott: {prompt, extractors, scorer, fields: {hub, local}}}``).
    protocols: dict = field(default_factory=dict)
    #: The protocol this task was prepared for (``for_protocol``) and whether it strips ``<think>`` blocks.
    protocol: str = "kvbench"
    strip_thinking: bool = True

    def for_protocol(self, protocol: Protocol) -> Task:
        """This task under ``protocol``: its prompt, gold, extractors and scorer from the ``protocols:`` block."""
        if protocol.prompts is None:
            return replace(self, protocol=protocol.name, strip_thinking=protocol.strip_thinking)
        block = self.protocols.get(protocol.prompts)
        if block is None:
            raise ConfigError(f"dataset {self.name} has no {protocol.prompts!r} prompt: --protocol {protocol.name} "
                              f"covers {', '.join(protocol_datasets(protocol.prompts)) or 'no dataset'}")
        extra = block.get("fields", {})
        return replace(
            self, protocol=protocol.name, strip_thinking=protocol.strip_thinking, system=None, prompt=block["prompt"],
            extractors=tuple(block["extractors"]), scorer=block["scorer"],
            hub=_with_fields(self.hub, extra.get("hub")), local=_with_fields(self.local, extra.get("local")),
            builtin=_with_fields(self.builtin, extra.get("builtin")),
        )

    def split(self, data_dir_override: str | None = None) -> str:
        """The split that ``load_examples`` reads with this data directory (local files, the hub, or built-in)."""
        if self.builtin:
            return "generated"
        if data_dir(data_dir_override) is not None and self.local:
            return "+".join(self.local.get("splits", ["test"]))
        return str((self.hub or {}).get("split", "test"))

    @property
    def prompt_hash(self) -> str:
        """Hash of what shapes the model's input (not of scoring, which `kvbench score` can redo)."""
        return hashlib.sha256(json.dumps([self.system, self.prompt]).encode()).hexdigest()[:12]

    def messages(self, example: Example) -> list[dict]:
        content, _ = self.user_content(example)
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": content}]

    def user_content(self, example: Example) -> tuple[str, list[tuple[int, int]]]:
        """The user message and the character ranges in it that came from the example (not the template)."""
        values = dict(example.fields)
        if isinstance(values.get("choices"), list):
            options = values["choices"]
            values["choices"] = "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(options))
            values["numbered_choices"] = "\n".join(f"{i + 1}. {text}" for i, text in enumerate(options))
            values["labels"] = ", ".join(LETTERS[: len(options)])
        try:
            return render_with_ranges(self.prompt, values)
        except KeyError as err:
            raise ConfigError(f"dataset {self.name}: the prompt uses field {err}, which the mapping lacks") from None

    def critical_spans(self, example: Example) -> list[tuple[int, int]]:
        """Character spans, in the user message, of the example's quantities, names and option labels."""
        content, ranges = self.user_content(example)
        return [(start + a, start + b) for start, stop in ranges for a, b in critical_spans(content[start:stop])]

    def score(self, response: str | None, gold: str, prompt: str | None = None) -> Scored:
        """Extract and score ``response``; ``prompt`` (as rendered) tells whether it starts inside ``<think>``."""
        extracted = extract(response or "", list(self.extractors), strip=self.strip_thinking,
                            opened=opens_thinking(prompt))
        if extracted is None:
            return Scored(None, False, {})
        correct, metrics = SCORERS[self.scorer](extracted, gold)
        return Scored(extracted, bool(correct), metrics)


def config_dir() -> Path:
    if os.environ.get(CONFIG_DIR_ENV):
        return Path(os.environ[CONFIG_DIR_ENV])
    return Path(__file__).resolve().parents[2] / "datasets_cfg"


def available() -> list[str]:
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def load_task(name: str) -> Task:
    path = config_dir() / f"{name}.yaml"
    if not path.is_file():
        raise DataError(f"unknown dataset {name!r} (known: {', '.join(available()) or 'none'})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: malformed YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ConfigError(f"{path}: missing keys {', '.join(missing)}")
    extra = set(raw) - set(Task.__dataclass_fields__)
    if extra:
        raise ConfigError(f"{path}: unknown keys {', '.join(sorted(extra))}")
    if not (raw.get("hub") or raw.get("local") or raw.get("builtin")):
        raise ConfigError(f"{path}: needs a hub, local or builtin source")
    names = [("extractor", n, EXTRACTORS) for n in raw["extractors"]] + [("scorer", raw["scorer"], SCORERS)]
    for layout in ("hub", "local", "builtin"):
        for spec in (raw.get(layout) or {}).get("fields", {}).values():
            names += [("transform", n, TRANSFORMS) for n in spec_transform_names(spec)]
    names += _protocol_names(path, raw.get("protocols") or {})
    for kind, name_, registry in names:
        if name_ not in registry:
            raise ConfigError(f"{path}: unknown {kind} {name_!r} (known: {', '.join(registry)})")
    raw["extractors"] = tuple(raw["extractors"])
    return Task(**raw)


def _protocol_names(path: Path, blocks: dict) -> list[tuple[str, str, dict]]:
    """Check each ``protocols:`` block's keys; return its registry names to look up."""
    if not isinstance(blocks, dict):
        raise ConfigError(f"{path}: protocols must be a mapping of protocol blocks")
    names = []
    for name, block in blocks.items():
        if not isinstance(block, dict) or {"prompt", "extractors", "scorer"} - set(block):
            raise ConfigError(f"{path}: protocol block {name!r} needs prompt, extractors and scorer")
        extra = set(block) - {"prompt", "extractors", "scorer", "fields"}
        if extra:
            raise ConfigError(f"{path}: protocol block {name!r}: unknown keys {', '.join(sorted(extra))}")
        names += [("extractor", n, EXTRACTORS) for n in block["extractors"]] + [("scorer", block["scorer"], SCORERS)]
        for layout_fields in (block.get("fields") or {}).values():
            for spec in layout_fields.values():
                names += [("transform", n, TRANSFORMS) for n in spec_transform_names(spec)]
    return names


def _with_fields(layout: dict | None, extra: dict | None) -> dict | None:
    """A layout whose field mapping gains (or overrides) ``extra``."""
    if layout is None or not extra:
        return layout
    return {**layout, "fields": {**layout.get("fields", {}), **extra}}


def protocol_datasets(block: str) -> list[str]:
    """The datasets whose configs have a ``block`` protocol block."""
    return [name for name in available() if block in (load_task(name).protocols or {})]


def data_dir(override: str | None = None) -> Path | None:
    value = override or os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def load_examples(task: Task, num_samples: int | None = None, data_dir_override: str | None = None,
                  subset_seed: int = 0, subset: str = "sample") -> list[Example]:
    """The task's examples; ``num_samples`` takes a fixed seeded subset, the same for every press and budget.

    ``subset`` "sample": sorted ``random.Random(subset_seed).sample``; "hf-shuffle": the first ``num_samples`` of
    ``datasets``' ``shuffle(seed=subset_seed)`` permutation (numpy's PCG64 ``permutation``), in that order.
    """
    if task.builtin:
        count = num_samples if num_samples is not None else int(task.builtin.get("size", 100))
        records = GENERATORS[task.builtin["generator"]](count, int(task.builtin.get("seed", 0)))
        return [_normalise(task, task.builtin, r, i) for i, r in enumerate(records)]
    directory = data_dir(data_dir_override)
    if directory is not None:
        if not task.local:
            raise DataError(f"dataset {task.name} has no local layout; unset {DATA_DIR_ENV} to use the hub")
        layout, records = task.local, _read_local(task, directory)
    else:
        if not task.hub:
            raise DataError(f"dataset {task.name} has no Hugging Face source; set {DATA_DIR_ENV}")
        layout, records = task.hub, _read_hub(task)
    expected = layout.get("size")
    if expected is not None and len(records) != int(expected):
        raise DataError(f"dataset {task.name}: {len(records)} examples, expected {expected} "
                        "(wrong split, another version, or a truncated file?)")
    examples = [_normalise(task, layout, r, i) for i, r in enumerate(records)]
    return [examples[i] for i in subset_indices(len(examples), num_samples, subset, subset_seed)]


def subset_indices(size: int, num_samples: int | None, subset: str = "sample", seed: int = 0) -> list[int]:
    """Indices of the ``num_samples`` examples a protocol's draw takes out of ``size``."""
    if subset == "hf-shuffle":  # the fork shuffles only when it takes a subset
        if num_samples is None:
            return list(range(size))
        import numpy as np

        order = np.random.default_rng(seed).permutation(size).tolist()
        return order[:num_samples]
    if num_samples is None or num_samples >= size:
        return list(range(size))
    return sorted(random.Random(seed).sample(range(size), num_samples))


def local_files(task: Task, directory: Path) -> list[Path]:
    local = task.local or {}
    return [directory / local.get("dir", task.name) / f"{s}.jsonl" for s in local.get("splits", ["test"])]


def _read_local(task: Task, directory: Path) -> list[dict]:
    records = []
    for path in local_files(task, directory):
        if not path.is_file():
            raise DataError(f"dataset {task.name}: {path} not found (set {DATA_DIR_ENV} or --data-dir to a "
                            f"directory laid out <dir>/<name>/<split>.jsonl, or unset it to use the hub)")
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path}:{n}: malformed JSON ({err.msg})") from None
    return records


def _read_hub(task: Task) -> list[dict]:
    hub = task.hub
    try:
        import datasets

        ds = datasets.load_dataset(hub["path"], hub.get("name"), split=hub.get("split", "test"),
                                   revision=hub.get("revision"))
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one line naming the fix
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        fix = f"set {DATA_DIR_ENV}=<dir> with local files"
        if hub.get("gated") or "gated" in text.lower() or "401" in text:
            fix = ("the dataset is gated: accept its terms on the Hugging Face hub and log in "
                   f"(`hf auth login` or HF_TOKEN), or {fix}")
        raise DataError(f"dataset {task.name}: cannot load {hub['path']} from the hub ({first}); {fix}") from None
    return [dict(r) for r in ds]


def _normalise(task: Task, layout: dict, record: dict, index: int) -> Example:
    specs = dict(layout.get("fields", {}))
    try:
        values = {key: resolve_field(record, spec) for key, spec in specs.items()}
    except KeyError as err:
        raise DataError(f"dataset {task.name}: example {index} has no field {err}") from None
    gold = values.pop("gold", None)
    if gold is None:
        raise DataError(f"dataset {task.name}: the field mapping has no gold")
    example_id = str(values.pop("id", f"{task.name}-{index}"))
    return Example(id=example_id, fields=values, gold=str(gold))
