"""What is stored, read back: tables in the paper's layout (``report``), paired statistics (``paired``), the
registered metrics (``metrics``), the paper's published figures (``references``), plots (``plots``) and
re-scoring (``rescore``).

May import: the store, tasks, presses (to label rows) and ``errors``/``checks``; never the engine, runs or the
command line: a report needs no model.
"""
