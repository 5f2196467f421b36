"""`kvbench verify`: the suite's oracles run against any press. Every press passes the checks the other test files
do not already run on it; three broken plug-ins fail the check that names their defect."""

import pytest

from kvbench.presses import make_press
from kvbench.verify import VerifyConfig, run_checks
from kvbench.verify.invariants import bounded, invalid_slots, stateless
from kvbench.verify.outputs import deterministic
from kvbench.verify.subject import NotApplicable, Subject
from tests.conftest import ALL_PRESSES, TEST_ARGS
from tests.test_cli import kvbench

EXAMPLE = "examples/my_press.py:ValueNormAttentionPress"


@pytest.mark.parametrize("press_name", ALL_PRESSES)
def test_every_press_passes_the_state_and_bound_checks(tiny_llama, press_name):
    """masking, full-cache, batch and no-growth run on every press in test_eviction_oracle, test_engine and
    test_bench; these are the rest of `kvbench verify`'s checks."""
    model, tokenizer = tiny_llama
    subject = Subject(model, tokenizer, lambda: make_press(press_name, TEST_ARGS.get(press_name)))
    for check in (lambda s: bounded(s, 10), lambda s: deterministic(s, 12), invalid_slots,
                  stateless):
        try:
            outcome = check(subject)
        except NotApplicable:
            continue
        assert outcome.status == "pass", outcome


@pytest.mark.parametrize(("press", "broken"), [
    ("tests.plugin_presses:SlotOrderPress", {"batch"}),
    ("tests.plugin_presses:SharedStatePress", {"stateless", "invalid-slots", "batch"}),
    ("tests.plugin_presses:IgnoresValidityPress", {"invalid-slots", "batch"}),
])
def test_broken_presses_fail_the_check_that_names_their_defect(press, broken):
    outcomes = run_checks(VerifyConfig(press, architectures=("tiny-llama",)))["tiny-llama"]
    failed = {o.check for o in outcomes if o.failed}
    assert failed == broken, outcomes
    for outcome in outcomes:
        if outcome.failed:
            assert outcome.where.startswith("step ") or outcome.where.startswith("changed: "), outcome


def test_verify_cli_certifies_the_example_press_on_every_architecture():
    result = kvbench("verify", EXAMPLE)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("full-cache", "masking", "batch", "bounded", "no-growth", "deterministic", "invalid-slots",
                 "stateless"):
        line = next(ln for ln in result.stdout.splitlines() if f" {name} " in ln)
        assert line.count("PASS") == 5, line
    assert "40 of 40 checks passed, none failed" in result.stdout


def test_verify_cli_exits_1_and_names_the_first_failure():
    result = kvbench("verify", "tests.plugin_presses:SlotOrderPress", "--arch", "tiny-qwen2", "-c", "batch,masking",
                     "-f", "markdown")
    assert result.returncode == 1, result.stderr
    assert "| batch " in result.stdout and "FAIL step" in result.stdout and "PASS max Δlogit" in result.stdout
    assert "first: batch on tiny-qwen2 at step" in result.stderr and ", layer " in result.stderr


def test_a_check_that_does_not_apply_is_not_a_pass():
    result = kvbench("verify", "full", "--arch", "tiny-llama", "-c", "masking,bounded")
    assert result.returncode == 1 and "NOTHING VERIFIED" in result.stderr
    assert result.stdout.count("n/a (evicts nothing)") == 2


def test_a_check_that_crashes_is_a_failed_check_in_the_table():
    result = kvbench("verify", "tests.plugin_presses:CrashingPress", "--arch", "tiny-llama", "-c", "bounded,batch",
                     "-f", "markdown")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout.count("FAIL") == 2
    assert "KeyError" in result.stdout + result.stderr
