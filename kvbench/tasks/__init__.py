"""Datasets as declarative YAML configs (``datasets_cfg/<name>.yaml``), loaded into normalised examples.

A config names its source (a built-in generator, a Hugging Face dataset, or local JSON Lines under
``--data-dir`` / ``KVBENCH_DATA_DIR`` laid out ``<dir>/<name>/<split>.jsonl``), the field mapping, the
prompt template, generation defaults, and its extractor chain and scorer *by registry name*.
This package knows nothing about torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kvbench.errors import ConfigError, DataError
from kvbench.tasks.arith import GENERATORS
from kvbench.tasks.extract import EXTRACTORS, extract
from kvbench.tasks.score import SCORERS
from kvbench.tasks.transforms import GOLD_TRANSFORMS

CONFIG_DIR_ENV = "KVBENCH_DATASETS_CFG"
DATA_DIR_ENV = "KVBENCH_DATA_DIR"
_REQUIRED = ("name", "version", "source", "fields", "prompt", "extractors", "scorer")


@dataclass(frozen=True)
class Example:
    id: str
    fields: dict  # what the prompt template may use
    gold: str


@dataclass(frozen=True)
class Task:
    name: str
    version: int
    source: dict
    fields: dict
    prompt: str
    extractors: tuple[str, ...]
    scorer: str
    system: str | None = None
    gold_transform: str = "identity"
    id_field: str | None = None
    generation: dict = field(default_factory=dict)
    answer_type: str = "number"
    description: str = ""

    @property
    def split(self) -> str:
        return str(self.source.get("split", "test"))

    @property
    def prompt_hash(self) -> str:
        text = json.dumps([self.system, self.prompt, list(self.extractors), self.scorer], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def messages(self, example: Example) -> list[dict]:
        try:
            content = self.prompt.format(**example.fields)
        except KeyError as err:
            raise ConfigError(f"dataset {self.name}: prompt uses field {err} that the mapping lacks") from None
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": content}]

    def extract(self, response: str) -> str | None:
        return extract(response, list(self.extractors))

    def score(self, extracted: str | None, gold: str) -> bool:
        return extracted is not None and SCORERS[self.scorer](extracted, gold)


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
    unknown = [n for n in raw["extractors"] if n not in EXTRACTORS]
    if unknown or raw["scorer"] not in SCORERS or raw.get("gold_transform", "identity") not in GOLD_TRANSFORMS:
        raise ConfigError(f"{path}: unknown extractor/scorer/transform name(s) in {raw['extractors']}, "
                          f"{raw['scorer']!r}, {raw.get('gold_transform')!r}")
    known = set(Task.__dataclass_fields__)
    extra = set(raw) - known
    if extra:
        raise ConfigError(f"{path}: unknown keys {', '.join(sorted(extra))}")
    raw["extractors"] = tuple(raw["extractors"])
    return Task(**raw)


def data_dir(override: str | None = None) -> Path | None:
    value = override or os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def load_examples(task: Task, num_samples: int | None = None, data_dir_override: str | None = None,
                  subset_seed: int = 0) -> list[Example]:
    """The task's examples; ``num_samples`` takes a fixed seeded subset, the same for every press and budget."""
    source = task.source
    if "builtin" in source:
        if num_samples is None:
            num_samples = int(source.get("size", 100))
        records = GENERATORS[source["builtin"]](num_samples, int(source.get("seed", 0)))
        return [_normalise(task, r, i) for i, r in enumerate(records)]
    records = _load_records(task, data_dir(data_dir_override))
    expected = source.get("size")
    if expected is not None and len(records) != int(expected):
        raise DataError(f"dataset {task.name}: {len(records)} examples, expected {expected} "
                        "(wrong split or a truncated file?)")
    examples = [_normalise(task, r, i) for i, r in enumerate(records)]
    if num_samples is not None and num_samples < len(examples):
        picked = sorted(random.Random(subset_seed).sample(range(len(examples)), num_samples))
        examples = [examples[i] for i in picked]
    return examples


def _load_records(task: Task, directory: Path | None) -> list[dict]:
    if directory is not None:
        local = task.source.get("local", {})
        path = directory / local.get("dir", task.name) / f"{local.get('split', task.split)}.jsonl"
        if not path.is_file():
            raise DataError(f"dataset {task.name}: {path} not found (set {DATA_DIR_ENV} or --data-dir to a "
                            f"directory laid out <dir>/<name>/<split>.jsonl, or unset it to use the hub)")
        records = []
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path}:{n}: malformed JSON ({err.msg})") from None
        return records
    hub = task.source.get("hf")
    if not hub:
        raise DataError(f"dataset {task.name}: no Hugging Face source and no {DATA_DIR_ENV} set")
    try:
        import datasets

        ds = datasets.load_dataset(hub["path"], hub.get("name"), split=hub.get("split", task.split),
                                   revision=hub.get("revision"))
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one line naming the fix
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"dataset {task.name}: cannot load {hub['path']} from the Hugging Face hub ({first}); "
                        f"for local files set {DATA_DIR_ENV}=<dir> with <dir>/{task.name}/{task.split}.jsonl") from None
    return [dict(r) for r in ds]


def _normalise(task: Task, record: dict, index: int) -> Example:
    try:
        fields = {key: record[src] for key, src in task.fields.items() if key != "gold"}
        gold = GOLD_TRANSFORMS[task.gold_transform](record[task.fields.get("gold", "answer")])
    except KeyError as err:
        raise DataError(f"dataset {task.name}: example {index} has no field {err}") from None
    example_id = str(record[task.id_field]) if task.id_field else f"{task.name}-{index}"
    return Example(id=example_id, fields=fields, gold=gold)
