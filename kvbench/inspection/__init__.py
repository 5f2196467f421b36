"""A picture of what each press kept: the trace of one example (``trace``) and its HTML and PNG (``render``).

May import: the engine, presses, tasks, models and runs (to plan as ``run`` does); never results or the command
line.
"""
