"""kvbench inside other tools: lm-evaluation-harness's ``--model kvbench`` (``lmeval``).

May import anything but the command line; nothing in kvbench imports it.
"""
