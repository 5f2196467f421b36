"""Datasets as declarative YAML configs (``datasets_cfg/<name>.yaml``, at the top of the repository and shipped in
the wheel as ``kvbench/datasets_cfg``), loaded into normalised examples.

A config declares a ``hub`` layout (Hugging Face ``datasets``: path, config name, split, revision, or an offline
mirror of it, ``kvbench.tasks.hub``) and/or a ``local`` layout (JSON Lines under ``--data-dir`` /
``KVBENCH_DATA_DIR``, ``<dir>/<local.dir>/<split>.jsonl``), or a built-in generator; each layout maps its own
fields to the same normalised example, and every example records where it was read. Prompt template,
generation defaults, extractor chain and scorer are named, never coded, in the YAML. This package knows nothing
about torch.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from kvbench.errors import ConfigError, DataError
from kvbench.tasks.arith import GENERATORS
from kvbench.tasks.critical import critical_spans, render_with_ranges
from kvbench.tasks.extract import EXTRACTORS, extract, opens_thinking
from kvbench.tasks.fields import LETTERS, TRANSFORMS, resolve_field, spec_transform_names
from kvbench.tasks.hub import DATA_DIR_ENV, files_digest, read_hub
from kvbench.tasks.protocols import Protocol
from kvbench.tasks.score import SCORERS
from kvbench.tasks.validate import check_option_order, check_values, protocol_names, with_fields

CONFIG_DIR_ENV = "KVBENCH_DATASETS_CFG"
_REQUIRED = ("name", "version", "prompt", "extractors", "scorer")


@dataclass(frozen=True)
class Example:
    id: str
    fields: dict  # what the prompt template may use (choices: a list of option texts)
    gold: str
    #: Where the data was read: ``hub:<path>@<commit>``, ``mirror:<path>@sha256:..``, ``local:sha256:..``,
    #: ``builtin:<generator>`` (the ``dataset_revision`` column).
    source: str = ""


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
    #: Per-protocol overrides (``protocols: {hott: {prompt, extractors, scorer, fields: {hub, local}, hub}}``):
    #: ``fields`` adds to a layout's field mapping, ``hub`` replaces the hub layout (another repository).
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
            hub=with_fields(block.get("hub", self.hub), extra.get("hub")),
            local=with_fields(self.local, extra.get("local")),
            builtin=with_fields(self.builtin, extra.get("builtin")),
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
    shipped = Path(str(importlib.resources.files("kvbench") / "datasets_cfg"))  # in an installed wheel
    return shipped if shipped.is_dir() else Path(__file__).resolve().parents[2] / "datasets_cfg"  # a checkout


def available() -> list[str]:
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def load_task(name: str) -> Task:
    path = config_dir() / f"{name}.yaml"
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name) or not path.is_file():
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
    check_values(path, raw)
    names = [("extractor", n, EXTRACTORS) for n in raw["extractors"]] + [("scorer", raw["scorer"], SCORERS)]
    for layout in ("hub", "local", "builtin"):
        for spec in (raw.get(layout) or {}).get("fields", {}).values():
            names += [("transform", n, TRANSFORMS) for n in spec_transform_names(spec)]
    for layout in ("hub", "local"):
        check_option_order(path, (raw.get(layout) or {}).get("option_order"))
    names += protocol_names(path, raw.get("protocols") or {})
    for kind, name_, registry in names:
        if name_ not in registry:
            raise ConfigError(f"{path}: unknown {kind} {name_!r} (known: {', '.join(registry)})")
    raw["extractors"] = tuple(raw["extractors"])
    return Task(**raw)


def protocol_datasets(block: str) -> list[str]:
    """The datasets whose configs have a ``block`` protocol block."""
    return [name for name in available() if block in (load_task(name).protocols or {})]


def data_dir(override: str | None = None) -> Path | None:
    value = override or os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def load_examples(task: Task, num_samples: int | None = None, data_dir_override: str | None = None,
                  subset_seed: int = 0, subset: str = "sample", revision: str | None = None,
                  check_size: bool = True) -> list[Example]:
    """The task's examples; ``num_samples`` takes a fixed seeded subset, the same for every press and budget.

    ``subset`` "sample": sorted ``random.Random(subset_seed).sample``; "hf-shuffle": the first ``num_samples`` of
    ``datasets``' ``shuffle(seed=subset_seed)`` permutation (numpy's PCG64 ``permutation``), in that order.
    ``revision`` overrides the hub layout's; ``check_size`` False accepts a split of another size (fixtures).
    """
    if task.builtin:
        if revision:
            raise DataError(f"dataset {task.name} is generated by kvbench: --dataset-revision does not apply")
        size = int(task.builtin.get("size", 100))
        count = size if num_samples is None else min(num_samples, size)
        records = GENERATORS[task.builtin["generator"]](count, int(task.builtin.get("seed", 0)))
        source = f"builtin:{task.builtin['generator']}"
        return [_normalise(task, task.builtin, r, i, source) for i, r in enumerate(records)]
    layout, records, source = _read(task, data_dir_override, revision)
    expected = layout.get("size")
    if check_size and expected is not None and len(records) != int(expected):
        raise DataError(f"dataset {task.name}: {len(records)} examples, expected {expected} "
                        "(wrong split, another version, or a truncated file?)")
    records = _reordered(layout, records)
    examples = [_normalise(task, layout, r, i, source) for i, r in enumerate(records)]
    _check_unique_ids(task, examples)
    return [examples[i] for i in subset_indices(len(examples), num_samples, subset, subset_seed)]


def _read(task: Task, data_dir_override: str | None, revision: str | None) -> tuple[dict, list[dict], str]:
    """The layout read (local files if a data directory is set, else the hub), its records and their source."""
    directory = data_dir(data_dir_override)
    if directory is not None:
        if not task.local:
            raise DataError(f"dataset {task.name} has no local layout; unset {DATA_DIR_ENV} to use the hub")
        if revision:
            raise DataError(f"--dataset-revision applies to the hub; unset {DATA_DIR_ENV} (local files have none)")
        records = _read_local(task, directory)
        return task.local, records, f"local:sha256:{files_digest(*local_files(task, directory))}"
    if not task.hub:
        raise DataError(f"dataset {task.name} has no Hugging Face source; set {DATA_DIR_ENV}")
    records, source = read_hub(task.name, task.hub, revision)
    return task.hub, records, source


def _reordered(layout: dict, records: list[dict]) -> list[dict]:
    """Apply the layout's ``option_order`` fix: ``rows`` whose ``field`` list is stored in another ``order``."""
    fix = layout.get("option_order")
    if not fix:
        return records
    records = list(records)
    for row in (r for r in fix["rows"] if r < len(records)):  # a fixture may hold fewer rows
        options = records[row][fix["field"]]
        records[row] = {**records[row], fix["field"]: [options[i] for i in fix["order"]]}
    return records


def _check_unique_ids(task: Task, examples: list[Example]) -> None:
    """Rows are stored per (run, example id): a repeated id would store two answers under one key."""
    if not examples:
        return
    example_id, count = Counter(e.id for e in examples).most_common(1)[0]
    if count > 1:
        raise DataError(f"dataset {task.name}: example id {example_id!r} appears {count} times; ids must be "
                        "unique (map another field to id in the YAML)")


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


def _normalise(task: Task, layout: dict, record: dict, index: int, source: str = "") -> Example:
    specs = dict(layout.get("fields", {}))
    try:
        values = {key: resolve_field(record, spec) for key, spec in specs.items()}
    except KeyError as err:
        raise DataError(f"dataset {task.name}: example {index} has no field {err}") from None
    gold = values.pop("gold", None)
    if gold is None:
        raise DataError(f"dataset {task.name}: the field mapping has no gold")
    example_id = str(values.pop("id", f"{task.name}-{index}"))
    return Example(id=example_id, fields=values, gold=str(gold), source=source)
