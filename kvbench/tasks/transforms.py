"""Gold-answer transforms applied when loading a dataset, by registry name."""

from __future__ import annotations

from collections.abc import Callable


def after_hashes(gold: str) -> str:
    """GSM8K: the final answer follows ``####`` at the end of the rationale."""
    return gold.rsplit("####", 1)[-1].strip().replace(",", "")


def identity(gold) -> str:
    return str(gold).strip()


GOLD_TRANSFORMS: dict[str, Callable[[str], str]] = {"after_hashes": after_hashes, "identity": identity}
