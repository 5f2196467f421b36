from __future__ import annotations

import sys

import typer


def lm_eval(ctx: typer.Context) -> None:
    """Run lm-evaluation-harness's own command line, unchanged, with kvbench's model registered as `kvbench`.

    Every argument goes to lm-eval (`kvbench lm-eval --help` prints lm-eval's help). For example:
    kvbench lm-eval --model kvbench --model_args pretrained=smollm2-135m,press=snapkv-d,budget=128 --tasks gsm8k.
    Model arguments beyond HFLM's: press, budget, press_args (key:value;key:value), dtype, device, seed.
    """
    import os

    from kvbench.errors import ConfigError

    os.environ.setdefault("LMEVAL_LOG_LEVEL", "WARNING")  # lm-eval's INFO lines off stderr (set it to see them)
    try:
        from lm_eval.__main__ import cli_evaluate

        from kvbench.integrations.lmeval import prepared_arguments  # importing registers --model kvbench
    except ImportError as err:
        raise ConfigError(f"lm-eval is not installed ({err}): pip install 'kvbench[lmeval]'") from None
    sys.argv = ["lm-eval", *prepared_arguments(list(ctx.args))]
    try:
        cli_evaluate()
    except (ValueError, KeyError, FileNotFoundError) as err:  # lm-eval's own refusals: one line
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"lm-eval: {(str(err).strip().splitlines() or [type(err).__name__])[0]}") from None
