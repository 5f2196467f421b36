"""Reading a dataset's ``hub`` layout through ``datasets``, and recording which revision was read.

The hub path calls ``datasets.load_dataset_builder`` (what ``load_dataset`` does inside) so that the commit the
hub resolved (``builder.hash``: the commit of ``revision``, a branch or ``refs/convert/parquet`` resolved at load
time) can be stored with every row. ``KVBENCH_HUB_MIRROR=<dir>`` reads ``<dir>/<owner>/<name>/`` instead of the
hub: a copy of the repository's files at the revision the config names (``hf download --repo-type dataset
<owner>/<name> --revision <rev> --local-dir <dir>/<owner>/<name>``), loaded by the same call with the same config
name, split and data files; the test suite's fixtures are such a mirror.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from kvbench.errors import DataError

HUB_MIRROR_ENV = "KVBENCH_HUB_MIRROR"
DATA_DIR_ENV = "KVBENCH_DATA_DIR"


def mirror_dir(path: str) -> Path | None:
    """The mirror's copy of hub repository ``path``, when a mirror is set and holds it."""
    root = os.environ.get(HUB_MIRROR_ENV)
    if not root:
        return None
    copy = Path(root).expanduser() / path
    return copy if copy.is_dir() else None


def read_hub(name: str, hub: dict, revision: str | None = None) -> tuple[list[dict], str]:
    """The records of ``hub``'s split, and where they came from (``hub:<path>@<commit>`` or ``mirror:...``)."""
    copy = mirror_dir(hub["path"])
    if copy is not None and revision:  # a user's --dataset-revision: the mirror holds one copy, of no revision
        raise DataError(f"--dataset-revision {revision}: {HUB_MIRROR_ENV} holds one copy of {hub['path']}, with no "
                        f"revisions; unset {HUB_MIRROR_ENV} to read that revision from the hub")
    revision = revision or hub.get("revision")
    try:
        import datasets

        builder = datasets.load_dataset_builder(
            str(copy) if copy else hub["path"], hub.get("name"), data_files=hub.get("data_files"),
            revision=None if copy else revision,
        )
        builder.download_and_prepare()
        ds = builder.as_dataset(split=hub.get("split", "test"))
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one line naming the fix
        raise DataError(_hub_failure(name, hub, err)) from None
    source = f"mirror:{hub['path']}@sha256:{files_digest(copy)}" if copy else f"hub:{hub['path']}@{builder.hash}"
    return [dict(r) for r in ds], source


def _hub_failure(name: str, hub: dict, err: Exception) -> str:
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    fix = f"set {DATA_DIR_ENV}=<dir> with local files"
    if hub.get("gated") or "gated" in text.lower() or "401" in text:
        fix = ("the dataset is gated: accept its terms on the Hugging Face hub and log in "
               f"(`hf auth login` or HF_TOKEN), or {fix}")
    return f"dataset {name}: cannot load {hub['path']} from the hub ({first}); {fix}"


def files_digest(*roots: Path) -> str:
    """A short sha256 over the files under ``roots`` (names and bytes), e.g. of local copies."""
    digest = hashlib.sha256()
    for root in roots:
        files = sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p.relative_to(root))) \
            if root.is_dir() else [root]
        for path in files:
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)  # e.g. the .cache/ that `hf download` leaves
