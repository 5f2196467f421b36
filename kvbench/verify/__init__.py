"""``kvbench verify``: the correctness oracles, run against any press on a tiny model of every supported
architecture. The test suite runs the same checks (``tests/test_eviction_oracle.py``, ``test_engine.py``,
``test_bench.py``): there is one oracle.

Each check is a function ``(Subject) -> Outcome``; ``_checks()`` lists them in the order the table prints them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from kvbench.errors import KvbenchError
from kvbench.verify.subject import NotApplicable, Outcome, Subject

ARCHITECTURES = ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral", "tiny-phi3")


@dataclass(frozen=True)
class Check:
    name: str
    claim: str
    run: Callable[[Subject], Outcome]


def _checks() -> list[Check]:
    from kvbench.verify import invariants, outputs

    def budgets(check, *values):  # one outcome for several budgets: the first failure, else the worst pass
        def run(subject):
            found = [check(subject, b) for b in values]
            return next((o for o in found if o.failed), found[-1])
        return run

    return [
        Check("full-cache", "budget >= length equals the full cache and HF generate", outputs.full_cache),
        Check("masking", "eviction equals masking: every step's logits equal a masked full forward (1e-4), "
              "budgets 12 and 40", budgets(outputs.masking, 12, 40)),
        Check("batch", "batched equals batch 1, sequences ending early, budgets 14 and 28",
              budgets(outputs.batched, 14, 28)),
        Check("bounded", "the cache never holds more than the press declares, budgets 10 and 50",
              budgets(invariants.bounded, 10, 50)),
        Check("no-growth", "no per-step allocation growth once the cache is full", invariants.no_growth),
        Check("deterministic", "two runs keep the same entries and give the same tokens",
              partial(outputs.deterministic, budget=12)),
        Check("invalid-slots", "scores of valid slots ignore the contents of invalid ones; no NaN",
              invariants.invalid_slots),
        Check("stateless", "a run leaves the press object unchanged (state lives in the cache)",
              invariants.stateless),
    ]


def check_names() -> list[str]:
    return [c.name for c in _checks()]


@dataclass(frozen=True)
class VerifyConfig:
    press: str
    press_args: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ARCHITECTURES
    checks: tuple[str, ...] = ()  # empty = all
    #: Where the tiny models run (``benchmarks/gpu_check.py`` runs the matrix in bfloat16 on CUDA).
    device: str = "cpu"
    dtype: str = "float32"


def validate(config: VerifyConfig) -> Callable:
    """Check the press, its arguments, the architectures and the checks; return the press factory. Builds no model
    but, for a press that reads per-model data and was given none, the first tiny one (to make that data)."""
    from kvbench.errors import ConfigError
    from kvbench.models import TINY_CONFIGS
    from kvbench.presses import make_press, parse_press_args

    for arch in config.architectures:
        if arch not in TINY_CONFIGS:
            raise ConfigError(f"--arch {arch!r} is not a tiny model (known: {', '.join(TINY_CONFIGS)})")
    for name in config.checks:
        if name not in check_names():
            raise ConfigError(f"--check {name!r} is unknown (known: {', '.join(check_names())})")
    args = parse_press_args(list(config.press_args), [config.press])[config.press]
    calibration = _calibration(config.press, args)
    if calibration is None:
        make_press(config.press, args)
    else:  # the other arguments are checked with a tiny model's data (run_checks makes each model's own)
        with tempfile.TemporaryDirectory() as workdir:
            make_press(config.press, {**args, calibration: str(_calibrated(config, workdir))})
    return partial(make_press, config.press, args)


def _calibration(press: str, args: dict) -> str | None:
    """The parameter a press reads its per-model statistics from, where it needs them and none was given:
    ``run_checks`` then calibrates each tiny model itself."""
    from kvbench.presses import PRESSES

    cls = PRESSES.get(press)
    name = getattr(cls, "calibration", None)
    return name if name is not None and name not in args else None


def _calibrated(config: VerifyConfig, workdir: str, arch: str | None = None, model=None, tokenizer=None) -> Path:
    """What the press reads of a tiny model (``kvbench.runs.calibrate.write_tiny_calibration``), in ``workdir``."""
    from kvbench.models import build_tiny
    from kvbench.runs.calibrate import write_tiny_calibration

    arch = arch or config.architectures[0]
    if model is None:
        model, tokenizer = build_tiny(arch)
    folder = Path(workdir) / arch
    folder.mkdir(exist_ok=True)
    return write_tiny_calibration(config.press, model.eval(), tokenizer, folder)


def run_checks(config: VerifyConfig, on_progress: Callable[[str, str], None] | None = None) -> dict[str, list[Outcome]]:
    """Outcomes per architecture, in ``CHECKS`` order. A check that raises fails with the error as its place."""
    import torch

    from kvbench.models import build_tiny

    make = validate(config)
    selected = [c for c in _checks() if not config.checks or c.name in config.checks]
    args = make.args[1]
    calibration = _calibration(config.press, args)
    results: dict[str, list[Outcome]] = {}
    with tempfile.TemporaryDirectory(prefix="kvbench-verify-") as workdir:
        for arch in config.architectures:
            model, tokenizer = build_tiny(arch)
            model.to(device=config.device, dtype=getattr(torch, config.dtype)).eval()
            if calibration is not None:  # the press reads this model's own statistics
                stats = str(_calibrated(config, workdir, arch, model, tokenizer))
                make = partial(make.func, config.press, {**args, calibration: stats})
            subject = Subject(model, tokenizer, make)
            results[arch] = []
            for check in selected:
                if on_progress:
                    on_progress(arch, check.name)
                torch.manual_seed(0)
                results[arch].append(_run_one(check, subject))
    return results


def _run_one(check: Check, subject: Subject) -> Outcome:
    try:
        return check.run(subject)
    except NotApplicable as why:
        return Outcome(check.name, "n/a", "", str(why))
    except KvbenchError as err:  # the press refuses the check's budget (e.g. below its windows): nothing judged
        return Outcome(check.name, "n/a", "", f"refused: {str(err).splitlines()[0][:160]}")
    except Exception as err:  # a press's own code fails the check that ran it: reported, never a traceback
        message = (str(err).splitlines() or [""])[0][:160]
        return Outcome(check.name, "fail", "error", f"{type(err).__name__}: {message}")


__all__ = ["ARCHITECTURES", "Check", "Outcome", "Subject", "VerifyConfig", "check_names", "run_checks", "validate"]
