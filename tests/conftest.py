import pytest
import torch

from kvbench.models import build_tiny

ARCHS = ("tiny-llama", "tiny-qwen2")
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
