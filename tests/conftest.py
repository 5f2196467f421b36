import os
import tempfile
from pathlib import Path

import pytest
import torch

from kvbench.models import build_tiny
from kvbench.presses import PRESSES

ARCHS = ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral", "tiny-phi3")
#: Every press, and the allocation wrappers composed with scoring presses (and with each other).
ALL_PRESSES = [*PRESSES, "pyramidkv:snapkv-d", "adakv:snapkv-d", "pyramidkv:adakv:h2o"]
#: Parameters that let a press act within a short test: buffers that fill, windows below small budgets.
TEST_ARGS = {
    "rkv": {"buffer": "4"}, "hott-rkv": {"buffer": "4"}, "hott-rkv-fixed": {"buffer": "4"}, "keydiff": {"buffer": "4"},
    "gkv": {"buffer": "4", "window_size": "2"}, "morphkv": {"window_size": "4"},
    "expected-attention": {"buffer": "4", "n_sink": "2", "n_future_positions": "16"},
    "quest": {"chunk_size": "4", "dense_layers": "1"},  # pages of 4 over the tiny models' 2-3 layers
    "rpc": {"window_size": "1"},  # --budget is RPC's period: it first compresses after budget + window tokens
    "hott-snapkv-d": {"window_size": "4"}, "hott-snapkv-d-fixed": {"window_size": "4"},
    "shadowkv": {"chunk_size": "2", "local_window": "2", "outlier_chunks": "1"},
    # budgets over 7; the separators the tiny models' tokenizer resolves (tests/test_sepllm.py checks them)
    "sepllm": {"n_init": "1", "sep_cache_size": "2", "local_size": "4", "separators": "13,11,30,0,26,25,198,220"},
}


def _tiny_statistics() -> str:
    """TriAttention's statistics of tiny-llama (``kvbench calibrate``'s, on its sample text), written once per
    test process. The five tiny architectures have the same shapes, so the engine-wide tests run triattention on
    every one with these; ``kvbench verify`` calibrates each architecture its own."""
    from kvbench.runs.calibrate import write_statistics

    # one fixed path (test ids show it, and the xdist workers must collect the same ids), written atomically
    path = Path(tempfile.gettempdir()) / f"kvbench-tests-{os.getuid()}" / "tiny-llama-triattention.pt"
    path.parent.mkdir(exist_ok=True)
    model, tokenizer = build_tiny("tiny-llama")
    partial = write_statistics(model.eval(), tokenizer, path.with_suffix(f".{os.getpid()}.pt"))
    os.replace(partial, path)
    return str(path)


def _tiny_gates() -> str:
    """Seeded random RLKV gates for the tiny models' 3 layers x 2 KV heads (``kvbench verify`` writes the same)."""
    from kvbench.runs.calibrate import write_random_gates

    path = Path(tempfile.gettempdir()) / f"kvbench-tests-{os.getuid()}" / "tiny-gates.tsv"
    path.parent.mkdir(exist_ok=True)
    partial = write_random_gates(build_tiny("tiny-llama")[0], path.with_suffix(f".{os.getpid()}.tsv"))
    os.replace(partial, path)
    return str(path)


TINY_STATISTICS = _tiny_statistics()
TINY_GATES = _tiny_gates()
#: What a press needs to be made, or to run on the tiny models' budgets, at all (its defaults otherwise): a
#: calibrated press's statistics; SepLLM's windows (its 4 + 64 + 224 need a budget over 292); RLKV's gates, and
#: sinks under the tiny budgets.
DEFAULT_ARGS = {"triattention": {"stats": TINY_STATISTICS}, "sepllm": TEST_ARGS["sepllm"],
                "rlkv": {"gates": TINY_GATES, "n_sink": "2"}}
TEST_ARGS["rlkv"] = DEFAULT_ARGS["rlkv"]
TEST_ARGS["triattention"] = {"buffer": "4", **DEFAULT_ARGS["triattention"]}


def default_press(name: str):
    """Press ``name`` with its defaults (and what it needs to be made at all: ``DEFAULT_ARGS``)."""
    from kvbench.presses import make_press

    return make_press(name, DEFAULT_ARGS.get(name))
PROMPT = "Tom has 12 apples. He buys 7 more and gives 5 to Ann. How many apples does Tom have now?"


@pytest.fixture(scope="session", params=ARCHS)
def tiny(request):
    model, tokenizer = build_tiny(request.param)
    model.eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_llama():
    model, tokenizer = build_tiny("tiny-llama")
    model.eval()
    return model, tokenizer


def prompt_ids(tokenizer, text=PROMPT):
    return tokenizer(text)["input_ids"]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def fail_on_call(monkeypatch, module, name, call, message):
    """Make ``module.name`` raise RuntimeError(message) on its ``call``-th call (1-based) and work otherwise."""
    real = getattr(module, name)
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise RuntimeError(message)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, flaky)


#: The local copies of the evaluation data, beside the checkout (as CI has them).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def require_shared_data(relative: str = "") -> Path:
    """``SHARED_DATA / relative``; where it is absent the test is skipped with the reason, or fails where
    ``KVBENCH_REQUIRE_DATA`` is set (CI sets it: there the data is beside the checkout, so a skip would hide a
    test that never ran)."""
    path = SHARED_DATA / relative
    if not path.exists():
        message = f"{path} absent (the local copies of the evaluation data live in ../shared/data)"
        if os.environ.get("KVBENCH_REQUIRE_DATA"):
            pytest.fail(f"KVBENCH_REQUIRE_DATA is set but {message}")
        pytest.skip(message)
    return path
