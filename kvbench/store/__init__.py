"""The result store: Parquet parts of one row per (run, example, sample) (``parts``), merged atomically
(``compaction``, ``journals``).

May import: ``errors`` and pyarrow only: the store knows nothing of the engine, presses, tasks or torch.
"""

from kvbench.store.parts import SCHEMA, ResultStore, conformable, part_schema, unreadable, write_part

__all__ = ["SCHEMA", "ResultStore", "conformable", "part_schema", "unreadable", "write_part"]
