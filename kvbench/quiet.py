"""Library chatter kept off stderr, so that what kvbench writes there is its own (an error is one line).

transformers, datasets and huggingface_hub log warnings (deprecations, retries of an unreachable hub) and raise
``FutureWarning``s that say nothing about the numbers. A user's own setting wins: each verbosity variable is only
defaulted, and ``PYTHONWARNINGS`` (or ``-W``) keeps Python's warnings as the user set them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import warnings

#: each library's verbosity variable, read when the library first configures its logger
_VERBOSITY = {"transformers": "TRANSFORMERS_VERBOSITY", "datasets": "DATASETS_VERBOSITY",
              "huggingface_hub": "HF_HUB_VERBOSITY"}


def quiet_libraries() -> None:
    """Errors only from the libraries' loggers; their deprecation and future warnings ignored."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # kvbench's own progress, one line per error
    for library, variable in _VERBOSITY.items():
        level = os.environ.setdefault(variable, "error")
        if library in sys.modules:  # imported already (e.g. under pytest): its logger was configured then
            logging.getLogger(library).setLevel(getattr(logging, level.upper(), logging.ERROR))
    if not sys.warnoptions:
        for category in (FutureWarning, DeprecationWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category, module=r"(transformers|datasets|huggingface_hub"
                                    r"|torch|accelerate|gguf)(\.|$)")
        warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations attributed to the caller


@contextlib.contextmanager
def no_library_progress_bars():
    """transformers' own bars (GGUF de-quantisation, weight loading) off while kvbench shows its own."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    # the GGUF conversion calls tqdm itself, whatever transformers' switch says
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()
        if bar is not None:
            gguf_utils.tqdm = bar


@contextlib.contextmanager
def native_stderr_muted():
    """File descriptor 2 sent to /dev/null for the block: for native code that writes there itself (the torch
    profiler's ``USDT: ... profiler_start`` lines), which Python's ``sys.stderr`` cannot redirect."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
