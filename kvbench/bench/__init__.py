"""Speed and memory: presses timed side by side (``core``), their stored rows and tables (``results``), whole runs
on a length mix (``workload``) and operators per decoding step (``opcount``).

May import: the engine, presses, models, the store and ``runs.session`` (to load a model with its provenance);
never results or the command line.
"""
