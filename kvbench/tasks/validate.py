"""Checks of a dataset config's values, run when it loads (before any model does), and layout helpers."""

from __future__ import annotations

import string
from pathlib import Path

from kvbench.errors import ConfigError
from kvbench.tasks.arith import GENERATORS
from kvbench.tasks.extract import EXTRACTORS
from kvbench.tasks.fields import TRANSFORMS, spec_transform_names
from kvbench.tasks.score import SCORERS


def check_values(path: Path, raw: dict) -> None:
    """The values a run would otherwise trip over after the model has loaded."""
    if raw["name"] != path.stem:
        raise ConfigError(f"{path}: name {raw['name']!r} is not the file's name {path.stem!r}")
    if type(raw["version"]) is not int or raw["version"] < 1:
        raise ConfigError(f"{path}: version must be a positive integer, got {raw['version']!r}")
    for layout in ("hub", "local", "builtin"):
        size = (raw.get(layout) or {}).get("size")
        if size is not None and (type(size) is not int or size < 1):
            raise ConfigError(f"{path}: {layout} size must be a positive integer, got {size!r}")
    generator = (raw.get("builtin") or {}).get("generator")
    if raw.get("builtin") and generator not in GENERATORS:
        raise ConfigError(f"{path}: unknown generator {generator!r} (known: {', '.join(GENERATORS)})")
    prompts = [("prompt", raw["prompt"], raw)] + [
        (f"protocols.{name}.prompt", block["prompt"], {**raw, **_protocol_layouts(raw, block)})
        for name, block in (raw.get("protocols") or {}).items() if isinstance(block, dict) and "prompt" in block]
    for where, prompt, layouts in prompts:
        _check_prompt(path, where, prompt, layouts)


def _protocol_layouts(raw: dict, block: dict) -> dict:
    """The layouts a protocol block reads: its own hub, and the base layouts with its extra fields."""
    extra = block.get("fields") or {}
    layouts = {k: with_fields(raw.get(k), extra.get(k)) for k in ("hub", "local", "builtin") if raw.get(k)}
    if block.get("hub"):
        layouts["hub"] = with_fields(block["hub"], extra.get("hub"))
    return layouts


def _check_prompt(path: Path, where: str, prompt, layouts: dict) -> None:
    """``prompt`` parses as a template and uses only fields every layout provides."""
    if not isinstance(prompt, str):
        raise ConfigError(f"{path}: {where} must be text")
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(prompt) if name}
    except ValueError as err:
        raise ConfigError(f"{path}: {where}: {err} (write a literal brace as {{{{ or }}}})") from None
    for kind in ("hub", "local", "builtin"):
        fields = set((layouts.get(kind) or {}).get("fields", {})) - {"gold", "id"}
        if layouts.get(kind) and "choices" in fields:
            fields |= {"numbered_choices", "labels"}
        missing = used - fields if layouts.get(kind) else set()
        if missing:
            raise ConfigError(f"{path}: {where} uses {', '.join(sorted(missing))}, which the {kind} layout lacks")


def check_option_order(path: Path, fix) -> None:
    if fix is None:
        return
    order = fix.get("order") if isinstance(fix, dict) else None
    rows = fix.get("rows") if isinstance(fix, dict) else None
    if not (isinstance(fix, dict) and isinstance(fix.get("field"), str) and isinstance(order, list)
            and sorted(order) == list(range(len(order))) and isinstance(rows, list)
            and all(isinstance(r, int) and r >= 0 for r in rows)):
        raise ConfigError(f"{path}: option_order needs field (a column), order (a permutation of 0..n-1) and rows "
                          "(row indices)")


def protocol_names(path: Path, blocks: dict) -> list[tuple[str, str, dict]]:
    """Check each ``protocols:`` block's keys; return its registry names to look up."""
    if not isinstance(blocks, dict):
        raise ConfigError(f"{path}: protocols must be a mapping of protocol blocks")
    names = []
    for name, block in blocks.items():
        if not isinstance(block, dict) or {"prompt", "extractors", "scorer"} - set(block):
            raise ConfigError(f"{path}: protocol block {name!r} needs prompt, extractors and scorer")
        extra = set(block) - {"prompt", "extractors", "scorer", "fields", "hub"}
        if extra:
            raise ConfigError(f"{path}: protocol block {name!r}: unknown keys {', '.join(sorted(extra))}")
        names += [("extractor", n, EXTRACTORS) for n in block["extractors"]] + [("scorer", block["scorer"], SCORERS)]
        layouts = [*(block.get("fields") or {}).values(), (block.get("hub") or {}).get("fields", {})]
        for layout_fields in layouts:
            for spec in layout_fields.values():
                names += [("transform", n, TRANSFORMS) for n in spec_transform_names(spec)]
    return names


def with_fields(layout: dict | None, extra: dict | None) -> dict | None:
    """A layout whose field mapping gains (or overrides) ``extra``."""
    if layout is None or not extra:
        return layout
    return {**layout, "fields": {**layout.get("fields", {}), **extra}}
