"""Runs: from a request (``RunConfig``) to stored rows. Planning and run keys (``plan``), storing a cell's rows
(``runner``), grids (``sweep``), teacher-forced fidelity (``fidelity``), the loaded model with its provenance
(``session``), and the measurements a row carries (``measurement_columns``).

May import: the engine, presses, tasks, models and the store (and ``errors``, ``checks``); never results, bench,
inspection, integrations, verify or the command line.
"""
